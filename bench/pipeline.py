"""Pipeline throughput on one CT series: load / inference / write, against matmul peak.

Writes a synthetic CT series (default 200 slices of 512x512) and harmonises it through
:func:`pipelines.harmonise.harmonise_series` as the node does (headers, routing, decoding,
inference, writing), with a shipped model's architecture and size (read from its
``model.json``; random weights, which time the same). Prints the time split (load =
headers + routing + model + pixels) and inference's effective GFLOP/s (forward FLOPs
counted by torch) next to this machine's fp32 and bf16 matmul GFLOP/s, measured in the same
run just before and just after the harmonisation (their mean is the reference). Targets:
load + write <= 15% of the total; inference >= 50% of the matmul throughput of the precision
inference ran in (decided, and timed, before the clock starts, with the CPU tiling, as the
node does once per model and machine).

    python3 bench/pipeline.py [--slices 200] [--size 512] [--model ct-kernel-sharp-to-smooth]
                              [--batch-size 8] [--no-bf16] [--device auto] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import structlog
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.harmonise import ModelCache, harmonise_series  # noqa: E402
from pipelines.inference import (  # noqa: E402
    InferenceSettings,
    choose_execution,
    resolve_device,
)
from pipelines.model_folder import read_model_info, save_model_folder  # noqa: E402
from pipelines.routing import parse_routes  # noqa: E402
from tests.dicom_factory import write_series  # noqa: E402
from tests.model_factory import random_generator  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "models"


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


def peak_gflops(device: torch.device) -> dict[str, float]:
    return {"fp32": matmul_gflops(torch.float32, device),
            "bf16": matmul_gflops(torch.bfloat16, device)}


def forward_flops(model: torch.nn.Module, size: int) -> int:
    """FLOPs of one slice through the generator."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, 1, size, size))
    return counter.get_total_flops()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--model", default="ct-kernel-sharp-to-smooth",
                        help="shipped model whose architecture and size to run")
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
    shipped = read_model_info(MODELS / args.model)
    if shipped.dims != 2 or shipped.source.get("Modality") != "CT":
        parser.error(f"--model {args.model}: this benchmark runs a 2D CT model")
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        root = Path(tmp)
        files = write_series(root / "in", slices=args.slices, size=args.size, kernel="B70f")
        generator = random_generator(shipped.architecture, **shipped.params)
        folder = save_model_folder(
            root / "models" / "bench", generator, name="bench", version="1",
            architecture=shipped.architecture, params=shipped.params, source=shipped.source,
            target=shipped.target, normalisation=shipped.normalisation.to_spec())
        routes = parse_routes([{"name": "bench", "model": "bench",
                                "match": {"Modality": "CT", "ConvolutionKernel": "B7*"}}])
        cache, executions = ModelCache(), root / "execution.json"
        # the node's once-per-model decision (precision, CPU tiles), outside the timed run
        sample = np.zeros((args.slices, args.size, args.size), np.float32)
        choose_execution(cache.get(folder).generator, sample, 2, settings,
                         key=read_model_info(folder).weights_sha256, cache=executions)
        # matmul peak measured just before and just after the timed run, and averaged:
        # a shared or thermally throttled CPU drifts by 10-20% over a minute
        before = peak_gflops(device)
        outcome = harmonise_series(files, routes=routes, models_dir=root / "models",
                                   out_dir=root / "out", options=settings, cache=cache,
                                   execution_cache=executions)
        assert outcome.status == "harmonised", outcome.reason
        after = peak_gflops(device)
    seconds = outcome.seconds
    total = sum(seconds.values())
    flops = forward_flops(generator, args.size) * args.slices
    inference_gflops = flops / seconds["inference"] / 1e9
    peak = {k: (before[k] + after[k]) / 2 for k in before}
    ran_in = outcome.precision or "fp32"
    reference = peak.get(ran_in, peak["fp32"])
    io_share = (seconds["load"] + seconds["write"]) / total
    report = {
        "series": f"{args.slices} x {args.size} x {args.size} CT",
        "model": f"{args.model} architecture: {shipped.architecture} {shipped.params}"
                 " (random weights)",
        "device": device.type, "threads": torch.get_num_threads(), "precision": ran_in,
        "cpu_tile": outcome.tile,
        "seconds": {k: round(v, 2) for k, v in seconds.items()} | {"total": round(total, 2)},
        "load_write_share": round(io_share, 3),
        "inference_tflop": round(flops / 1e12, 2),
        "inference_gflops": round(inference_gflops, 1),
        "matmul_gflops": {k: round(v, 1) for k, v in peak.items()},
        "matmul_gflops_before_after": {k: [round(before[k], 1), round(after[k], 1)]
                                       for k in before},
        "inference_vs_matmul": round(inference_gflops / reference, 3),
        "targets": {"load_write_share<=0.15": io_share <= 0.15,
                    "inference_vs_matmul>=0.5": inference_gflops / reference >= 0.5},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
