"""Resident memory over many received instances: does the node's RSS grow with what it has
received? (Per-association or per-instance state that is never dropped would show here.)

A node is started on loopback (series kept open, so nothing is harmonised meanwhile) and
dcmtk's storescu sends ``--batches`` batches of ``--associations`` series at once, each of
``--per-association`` fresh instances. After each batch the node's VmRSS is sampled; the
first batch warms the process up (imports, caches, the index's pages), so the growth is
measured from its end to the last batch's.

    python3 bench/resident.py [--batches 10] [--associations 4] [--per-association 125]
                              [--size 256]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.receive import count_files, send  # noqa: E402
from tests.dicom_factory import write_series  # noqa: E402
from tests.nodeutil import NodeProcess, free_port, wait_for, write_config  # noqa: E402


def resident_mib(pid: int) -> float:
    """The process's resident set now (VmRSS), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--associations", type=int, default=4)
    ap.add_argument("--per-association", type=int, default=125)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-resident-"))
    node = NodeProcess(write_config(work / "node.toml", port := free_port(), work / "var",
                                    series_timeout=3600), work / "node.log")
    stored = count_files(work / "var" / "spool", "*.dcm")
    samples: list[float] = []
    seed = 0
    try:
        node.start()
        assert node.proc is not None
        for batch in range(args.batches):
            folders = []
            for _ in range(args.associations):
                seed += 1
                folders.append(work / f"in-{seed}")
                write_series(folders[-1], slices=args.per_association, size=args.size,
                             seed=seed)
            send(port, "HARMONISE", folders)
            total = (batch + 1) * args.associations * args.per_association
            wait_for(lambda t=total: stored() >= t, 60, what="the node to hold them")
            samples.append(resident_mib(node.proc.pid))
            print(f"after {total:6d} instances  node RSS {samples[-1]:7.1f} MiB", flush=True)
            for folder in folders:
                shutil.rmtree(folder)
    finally:
        if node.proc is not None:
            node.stop()
        shutil.rmtree(work)
    received = (args.batches - 1) * args.associations * args.per_association
    growth = samples[-1] - samples[0]
    print(f"growth after warm-up: {growth:+.1f} MiB over {received} instances"
          f" ({growth * 1024 / max(received, 1):+.2f} KiB per instance)")


if __name__ == "__main__":
    main()
