"""Benchmark the CT simulator: a 100-slice 512x512 series on 2 cores (target: <= 60 s).

    python bench/simulate.py [--slices 100] [--size 512] [--domain siemens-b30f] [--threads 2]

Prints the wall time (phantom, physics and DICOM writing included) and slices per second.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainers.simulation import simulate_series  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--domain", default="siemens-b30f")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    modality = "MR" if "t1w" in args.domain or "t2w" in args.domain else "CT"
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        paths = simulate_series(modality, args.domain, Path(tmp), slices=args.slices,
                                size=args.size, progress=False)
        seconds = time.perf_counter() - start
    print(f"{args.domain}: {len(paths)} files, {args.slices} slices {args.size}x{args.size}, "
          f"{args.threads} threads: {seconds:.1f} s, {args.slices / seconds:.2f} slices/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
