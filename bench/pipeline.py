"""Harmonisation speed per shipped model, in the node's own pipeline, against matmul peak.

For every model folder (default: all under models/), a simulated series of the model's source
scanner (100 slices, CT 512², MR 256²: the README walkthrough's series) goes through
:func:`pipelines.harmonise.harmonise_series` as the node runs it: headers, the model, decoding,
normalisation, resampling to the model's pixel spacing, inference, grain, the derived series
written and fsynced. Per model: seconds per slice (total, and the load / inference / write
split), GFLOP per working slice (:mod:`pipelines.cost`, as model.json records it), inference
GFLOP/s and its share of this machine's fp32 matmul throughput measured in the same run (at
the start and at the end; bf16 too where the device computes it natively), and the CPU
seconds the process spent per slice (all threads: on a machine shared with other work, what
a slice needs of the cores; its wall time is what is left of them). The execution
(precision, CPU tiles) is decided first, and one short warm-up series run, as a node does
before its first series; the machine's load average is recorded with the numbers.

``--before REV`` runs the same series through other versions of the models (a git revision
whose models/ is taken, or a folder of model folders), alternating with the current ones,
so "before -> after" is measured under the same conditions. On CUDA, ``--in-flight N``
series are harmonised at once by N threads (decoding and writing one while the GPU runs
another, as a node's worker concurrency does) and the GPU's utilisation is sampled.

    python3 bench/pipeline.py [--model NAME ...] [--before REV|DIR] [--slices 100]
        [--size N] [--repeat 1] [--device auto|cpu|cuda] [--batch-size N] [--threads N]
        [--in-flight N] [--no-bf16] [--data DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pipelines  # noqa: E402, F401, I001  (first: it sets OpenMP's wait policy for torch)
import structlog  # noqa: E402
import torch  # noqa: E402

from pipelines.cost import gflop  # noqa: E402
from pipelines.harmonise import ModelCache, harmonise_series  # noqa: E402
from pipelines.inference import (  # noqa: E402
    InferenceSettings,
    autocast_dtype,
    choose_execution,
    resolve_device,
)
from pipelines.model_folder import ModelInfo, list_model_folders  # noqa: E402
from pipelines.series import load_series  # noqa: E402
from pipelines.spacing import working_shape  # noqa: E402
from trainers.simulation import simulate_series  # noqa: E402
from trainers.simulation.series import DEFAULT_SIZE  # noqa: E402

SUBJECT = 100  # a held-out subject of the shipped models
WARM_UP_SLICES = 4


def matmul_gflops(dtype: torch.dtype, device: torch.device, n: int = 2048,
                  seconds: float = 2.0) -> float:
    """Sustained n x n matmul throughput in GFLOP/s."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.matmul(a, b)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
        runs += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2 * n**3 * runs / (time.perf_counter() - start) / 1e9


def peak_gflops(device: torch.device, bf16: bool) -> dict[str, float]:
    """fp32 matmul GFLOP/s, and bf16 where the device computes it natively (emulated bf16
    on a CPU without it runs at a fraction of a GFLOP/s and is no reference)."""
    peak = {"fp32": matmul_gflops(torch.float32, device)}
    if bf16 and autocast_dtype(device, True) is not None:
        peak["bf16"] = matmul_gflops(torch.bfloat16, device)
    return peak


def models_at(before: str, out: Path) -> Path:
    """A folder of model folders: ``before`` itself, or the models/ of git revision
    ``before`` extracted into ``out``."""
    if Path(before).is_dir():
        return Path(before)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", before, "models"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(out, filter="data")
    return out / "models"


def source_series(info: ModelInfo, slices: int, size: int | None, data: Path) -> list[Path]:
    """The simulated series of the model's source scanner (kept in ``data``)."""
    modality, domain = str(info.source["Modality"]), str(info.source["name"])
    size = size or DEFAULT_SIZE[modality]
    folder = data / f"{domain}-{SUBJECT}-{slices}x{size}"
    if not folder.is_dir():
        partial = folder.with_name(folder.name + ".partial")
        simulate_series(modality, domain, partial, subject=SUBJECT, slices=slices, size=size,
                        progress=False)
        partial.rename(folder)
    return sorted(folder.glob("*.dcm"))


class Utilisation:
    """The GPU's utilisation, sampled every 50 ms while the block runs (needs pynvml)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.samples, self._stop = device, [], threading.Event()

    def __enter__(self) -> Utilisation:
        if self.device.type == "cuda":
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.samples.append(torch.cuda.utilization(self.device))
            except Exception:  # no pynvml / NVML: leave it unmeasured
                return

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self.device.type == "cuda":
            self._thread.join()

    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def run_model(name: str, models_dir: Path, files: list[Path], settings: InferenceSettings,
              in_flight: int, out: Path) -> dict[str, Any]:
    """Decide the execution, warm up, then harmonise ``in_flight`` copies of the series at
    once (one on the CPU) and time it."""
    cache, executions = ModelCache(), out / "execution.json"
    model = cache.get(models_dir / name)
    info, device = model.info, resolve_device(settings.device)
    volume = load_series(files[:WARM_UP_SLICES])
    work = working_shape(volume.array.shape[1:], volume.spacing[1:], info.pixel_spacing)
    sample = load_series(files[:max(2, settings.batch_size)]).array
    choose_execution(model.generator, sample, info.dims, settings, key=info.weights_sha256,
                     cache=executions)

    def harmonise(series: list[Path], where: str) -> Any:
        outcome = harmonise_series(series, routes=[], models_dir=models_dir, out_dir=out / where,
                                   options=settings, model_name=name, cache=cache,
                                   execution_cache=executions)
        assert outcome.status == "harmonised", outcome.reason
        return outcome

    harmonise(files[:WARM_UP_SLICES], "warm-up")
    load = os.getloadavg()[0]
    with Utilisation(device) as gpu, ThreadPoolExecutor(in_flight) as pool:
        start, cpu = time.perf_counter(), time.process_time()
        outcomes = list(pool.map(harmonise, [files] * in_flight,
                                 [f"run-{k}" for k in range(in_flight)]))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    slices = len(files) * in_flight
    cost = gflop(model.generator.cpu().float(), *work)
    split = {k: sum(o.seconds[k] for o in outcomes) / slices for k in outcomes[0].seconds}
    return {"model": name, "version": info.version, "architecture": info.architecture,
            "params": info.params, "working_slice": list(work),
            "gflop_per_slice": round(cost, 4),
            "model_json_gflop": (info.cost or {}).get("gflop_per_slice"),
            "execution": f"{outcomes[0].precision or 'fp32'}"
                         + (f" tile {outcomes[0].tile}" if outcomes[0].tile else ""),
            "slices": slices, "seconds": round(wall, 3), "s_per_slice": round(wall / slices, 4),
            "cpu_s_per_slice": round(cpu / slices, 4),
            "split_s_per_slice": {k: round(v, 4) for k, v in split.items()},
            "inference_gflops": round(cost / split["inference"], 1) if cost else 0.0,
            "gpu_utilisation_percent": gpu.mean(), "load_average": round(load, 2)}


def table(rows: list[dict[str, Any]], peak: dict[str, float]) -> str:
    """The results as a plain-text table (one line per model and variant)."""
    head = (f"{'model':32} {'variant':7} {'version':7} {'architecture':13} {'GFLOP':>7}"
            f" {'s/slice':>8} {'load':>7} {'infer':>7} {'write':>7} {'CPU s':>7} {'GFLOP/s':>8}"
            f" {'of peak':>7}  execution, load average")
    lines = [head]
    for r in rows:
        split = r["split_s_per_slice"]
        reference = peak.get(r["execution"].split()[0], peak["fp32"])
        lines.append(
            f"{r['model']:32} {r['variant']:7} {r['version']:7} {r['architecture']:13}"
            f" {r['gflop_per_slice']:7.3f} {r['s_per_slice']:8.4f} {split['load']:7.4f}"
            f" {split['inference']:7.4f} {split['write']:7.4f} {r['cpu_s_per_slice']:7.4f}"
            f" {r['inference_gflops']:8.1f}"
            f" {r['inference_gflops'] / reference:7.3f}  {r['execution']}, {r['load_average']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="a model folder name (repeatable;"
                        " default: every model under --models-dir)")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--before", help="git revision, or folder of model folders, to run"
                        " side by side with --models-dir (e.g. the commit before a change)")
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=0, help="matrix (default: CT 512, MR 256)")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per model and variant")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=0,
                        help="slices per forward pass (default: 8 on the CPU, 32 on CUDA)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's)")
    parser.add_argument("--in-flight", type=int, default=0,
                        help="series harmonised at once (default: 1 on the CPU, 2 on CUDA)")
    parser.add_argument("--no-bf16", action="store_true")
    parser.add_argument("--data", type=Path, help="keep the simulated series here")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr),
                        wrapper_class=structlog.make_filtering_bound_logger(30))
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    settings = InferenceSettings(device=device.type,
                                 batch_size=args.batch_size or (32 if cuda else 8),
                                 bf16=not args.no_bf16, threads=args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)
    in_flight = args.in_flight or (2 if cuda else 1)
    found = [m for m in list_model_folders(args.models_dir) if isinstance(m, ModelInfo)]
    names = args.model or [m.name for m in found if m.dims == 2]
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        root = Path(tmp)
        data = args.data or root / "series"
        variants = {"after": args.models_dir}
        if args.before:
            variants = {"before": models_at(args.before, root / "before"), **variants}
        start_peak = peak_gflops(device, settings.bf16)
        rows = []
        for name in names:
            info = next(m for m in found if m.name == name)
            files = source_series(info, args.slices, args.size or None, data)
            for k in range(args.repeat):
                for variant, folder in variants.items():
                    if not (folder / name / "model.json").is_file():
                        continue
                    out = root / f"{variant}-{name}-{k}"
                    rows.append({"variant": variant,
                                 **run_model(name, folder, files, settings, in_flight, out)})
                    print(table(rows[-1:], start_peak).splitlines()[1], file=sys.stderr,
                          flush=True)
        end_peak = peak_gflops(device, settings.bf16)
    peak = {k: (start_peak[k] + end_peak[k]) / 2 for k in start_peak}
    machine = {"device": torch.cuda.get_device_name(device) if cuda else platform.processor()
               or platform.machine(), "cpu_count": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "batch_size": settings.batch_size, "in_flight": in_flight,
               "matmul_gflops": {k: round(v, 1) for k, v in peak.items()},
               "matmul_gflops_start_end": {k: [round(start_peak[k], 1), round(end_peak[k], 1)]
                                           for k in peak},
               "load_average_end": [round(v, 2) for v in os.getloadavg()],
               "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(machine))
    print(table(rows, peak))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "runs": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
