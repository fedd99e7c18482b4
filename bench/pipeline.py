"""Pipeline throughput on one CT series: load / inference / write, against matmul peak.

Writes a synthetic CT series (default 200 slices of 512x512), harmonises it with a
``plain`` residual CNN through :func:`pipelines.harmonise.harmonise_series`, and prints the
time split and inference's effective GFLOP/s (forward FLOPs counted by torch) next to the
machine's own matmul GFLOP/s in fp32 and bf16, measured in the same run.
Targets: load + write <= 15% of the total; inference >= 50% of matmul throughput (of the
precision inference ran in).

    python3 bench/pipeline.py [--slices 200] [--size 512] [--features 32] [--blocks 6]
                              [--batch-size 8] [--no-bf16] [--device auto] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import structlog
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.harmonise import ModelCache, harmonise_series  # noqa: E402
from pipelines.inference import InferenceSettings, resolve_device  # noqa: E402
from pipelines.model_folder import save_model_folder  # noqa: E402
from pipelines.networks import build_generator  # noqa: E402
from tests.dicom_factory import write_series  # noqa: E402


def matmul_gflops(dtype: torch.dtype, device: torch.device, n: int = 2048,
                  seconds: float = 2.0) -> float:
    """Sustained n x n matmul throughput in GFLOP/s."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.matmul(a, b)  # warm-up
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
        runs += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * runs / (time.perf_counter() - start) / 1e9


def forward_flops(model: torch.nn.Module, size: int) -> int:
    """FLOPs of one slice through the generator."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, 1, size, size))
    return counter.get_total_flops()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--patch-size", type=int, default=0)
    parser.add_argument("--no-bf16", action="store_true")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    settings = InferenceSettings(device=args.device, batch_size=args.batch_size,
                                 patch_size=args.patch_size, bf16=not args.no_bf16,
                                 threads=args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(settings.device)
    params = {"features": args.features, "blocks": args.blocks, "dims": 2}
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        root = Path(tmp)
        files = write_series(root / "in", slices=args.slices, size=args.size)
        generator = build_generator("plain", params)
        torch.nn.init.normal_(generator.body[-1].weight, std=1e-3)  # not the identity
        save_model_folder(root / "models" / "bench", generator, name="bench", version="1",
                          architecture="plain", params=params, source={"Modality": "CT"},
                          target={"Modality": "CT"},
                          normalisation={"kind": "hu_window", "low": -1024, "high": 3071})
        cache = ModelCache()
        # a fresh precision cache: the model is timed in bf16 and fp32 as the node would
        outcome = harmonise_series(files, routes=(), models_dir=root / "models",
                                   out_dir=root / "out", options=settings, model_name="bench",
                                   cache=cache, precision_cache=root / "precision.json")
        assert outcome.status == "harmonised", outcome.reason
    seconds = outcome.seconds
    total = sum(seconds.values())
    flops = forward_flops(generator, args.size) * args.slices
    inference_gflops = flops / seconds["inference"] / 1e9
    peak = {"fp32": matmul_gflops(torch.float32, device),
            "bf16": matmul_gflops(torch.bfloat16, device)}
    ran_in = outcome.precision or "fp32"
    reference = peak.get(ran_in, peak["fp32"])
    io_share = (seconds["load"] + seconds["write"]) / total
    report = {
        "series": f"{args.slices} x {args.size} x {args.size} CT",
        "model": f"plain features={args.features} blocks={args.blocks}",
        "device": device.type, "threads": torch.get_num_threads(), "precision": ran_in,
        "seconds": {k: round(v, 2) for k, v in seconds.items()} | {"total": round(total, 2)},
        "load_write_share": round(io_share, 3),
        "inference_tflop": round(flops / 1e12, 2),
        "inference_gflops": round(inference_gflops, 1),
        "matmul_gflops": {k: round(v, 1) for k, v in peak.items()},
        "inference_vs_matmul": round(inference_gflops / reference, 3),
        "targets": {"load_write_share<=0.15": io_share <= 0.15,
                    "inference_vs_matmul>=0.5": inference_gflops / reference >= 0.5},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
