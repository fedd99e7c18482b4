"""Rebuild the shipped models from simulated data: simulate, train, evaluate.

    python -m trainers.ship_models [--only NAME] [--work runs/ship] [--models-dir models]

Everything is seeded, runs on the CPU and prints each ``dicomnode`` command (with its
output) on stderr before running it; stdout is the evaluations' JSON. Training series and
held-out test series come from different simulated subjects; for the unpaired and synthetic
models the source and target training subjects differ too, so no anatomy is shared between
the two sides. Each model is evaluated at the matrices the shipped routes send it: 128² (where
most train; ``report/evaluation``) and the clinical matrix (``report/evaluation-clinical``),
except the two MR models, which the routes split by pixel size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from trainers import simulation
from trainers.simulation import simulate_series
from trainers.simulation.series import DEFAULT_SIZE

SLICES = 16
TEST_SUBJECTS = (100, 101, 102)
SMALL = 128  # the matrix the models train on by default: minutes on a CPU
REPORTS = ("evaluation", "evaluation-clinical")  # under report/: 128², clinical matrix


@dataclass(frozen=True)
class Spec:
    modality: str
    source: str
    target: str
    mode: str  # paired | unpaired
    source_subjects: tuple[int, ...]
    target_subjects: tuple[int, ...]
    args: tuple[str, ...] = field(default=())
    train_sizes: tuple[int, ...] = (SMALL,)  # each training subject at each matrix
    version: str = "1.0"  # a retrained shipped model gets a new one
    reports: tuple[str, ...] = REPORTS  # evaluated where conf/node.toml routes series to it
    # multidomain: every scanner trained, ``target`` (the shipped routes' target_domain)
    # first; scanner k trains on ``source_subjects`` + 10 k, so no two share a subject, and
    # ``source`` is one the shipped routes send to it
    domains: tuple[str, ...] = ()
    # False: built only with --only NAME, never copied to conf/node.toml's routes (a recipe
    # whose model did not meet its targets: docs/models/multisite.md)
    shipped: bool = True

    def subjects(self, domain: str) -> tuple[int, ...]:
        """The training subjects of one of the model's domains."""
        if self.domains:
            shift = 10 * self.domains.index(domain)
            return tuple(s + shift for s in self.source_subjects)
        return self.source_subjects if domain == self.source else self.target_subjects

    def sizes(self) -> dict[str, int]:
        """Report folder -> matrix of the held-out series evaluated there: 128 and the
        simulator's default, clinical one (CT 512, MR 256). Pixel size changes the noise
        per pixel and the scale of anatomy in pixels, so a model is measured at each
        matrix its route takes."""
        every = dict(zip(REPORTS, (SMALL, DEFAULT_SIZE[self.modality]), strict=True))
        return {report: every[report] for report in self.reports}


# GE 1.5 T T1w -> Siemens 3 T: an unpaired U-Net (CycleGAN with identity and Gram losses)
# trained on each matrix natively; at 256², 0.94 mm: finer than the coarse route takes
MR_T1W = Spec(
    "MR", "ge-1.5t-t1w", "siemens-3t-t1w", "unpaired", tuple(range(6)), tuple(range(10, 16)),
    ("--architecture", "unet", "--param", "features=16", "--param", "levels=3",
     "--patch", "64", "--batch", "4", "--steps", "4000", "--identity", "1",
     "--cycle", "10", "--gram", "10", "--disc-features", "16", "--disc-layers", "3",
     "--val-every", "100", "--minutes", "55"), train_sizes=(128, 256), version="1.1",
    reports=("evaluation-clinical",))

MODELS = {
    # two reconstructions of the same raw data differ by the ratio of the kernels' transfer
    # functions: a spectral filter (32 gains: 0.02 cycles/pixel apart) learns it from the
    # pairs, at milliseconds per slice (version 1.1, a 32-feature plain CNN: 29 GFLOP)
    "ct-kernel-sharp-to-smooth": Spec(
        "CT", "siemens-b70f", "siemens-b30f", "paired", tuple(range(6)), tuple(range(6)),
        ("--architecture", "spectral", "--param", "knots=32", "--patch", "128", "--batch", "8",
         "--steps", "1000", "--lr", "1e-2", "--ssim", "0.5", "--val-every", "100",
         "--minutes", "45"), version="2.0"),
    "ct-vendor-ge-to-siemens": Spec(
        "CT", "ge-standard", "siemens-b30f", "unpaired", tuple(range(6)), tuple(range(10, 16)),
        # GE's standard kernel and Siemens' B30f differ by a transfer function, seen in the
        # noise texture at the clinical matrix: a spectral filter, trained there, under
        # the noise-power-spectrum loss
        ("--architecture", "spectral", "--param", "knots=16", "--patch", "64", "--batch",
         "8", "--steps", "600", "--lr", "5e-3", "--identity", "0.5", "--cycle", "10",
         "--spectrum", "10", "--disc-features", "16", "--disc-layers", "3",
         "--val-every", "100", "--minutes", "30"), train_sizes=(512,), version="1.1"),
    "mr-t1w-ge15-to-siemens3": MR_T1W,
    # GE's acquisition fitted on six GE and sixteen other Siemens subjects, pairs
    # synthesised from the Siemens series, a paired U-Net trained on them at 0.9375 mm (the
    # 128² series resampled), Siemens' grain chosen on the real GE series; evaluated at
    # 128², as its route takes series coarser than 1.2 mm
    "mr-t1w-ge15-to-siemens3-coarse": Spec(
        "MR", "ge-1.5t-t1w", "siemens-3t-t1w", "synthetic", tuple(range(6)),
        tuple(range(10, 26)),
        ("--architecture", "unet", "--param", "features=32", "--param", "levels=3",
         "--pixel-spacing", "0.9375", "--patch", "64", "--batch", "4", "--steps", "12000",
         "--ssim", "1", "--val-every", "100", "--minutes", "55"), version="2.0",
        reports=("evaluation",)),
    # One StarGAN v2 for four MR T1w scanners (each trained on its own six subjects, none
    # shared), meant for a route converting Philips' and Canon's to Siemens 3 T (GE's have
    # their pairwise models); learnt and evaluated at 128²
    "mr-t1w-multisite": Spec(
        "MR", "philips-3t-t1w", "siemens-3t-t1w", "multidomain", tuple(range(6)), (),
        ("--param", "features=16", "--param", "levels=3", "--style-dim", "16", "--patch", "64",
         "--batch", "4", "--steps", "4000", "--cycle", "10", "--identity", "1", "--gram", "10",
         "--reference-share", "0.5", "--disc-features", "16", "--val-every", "250",
         "--minutes", "65"),
        reports=("evaluation",), shipped=False,
        domains=("siemens-3t-t1w", "ge-1.5t-t1w", "philips-3t-t1w", "canon-1.5t-t1w")),
    # One StarGAN v2 for five CT chest reconstructions (three vendors, smooth and sharp
    # kernels, 100 and 120 kVp) under the noise-power-spectrum loss, meant for a
    # route converting GE's LUNG and Philips' B to Siemens B30f (the others have pairwise
    # models)
    "ct-multisite": Spec(
        "CT", "philips-b", "siemens-b30f", "multidomain", tuple(range(6)), (),
        ("--param", "features=16", "--param", "levels=3", "--style-dim", "16", "--patch", "64",
         "--batch", "8", "--steps", "4000", "--cycle", "10", "--identity", "1", "--spectrum",
         "10", "--disc-features", "16", "--val-every", "250", "--minutes", "65"),
        reports=("evaluation",), shipped=False,
        domains=("siemens-b30f", "siemens-b70f", "ge-standard", "ge-lung", "philips-b")),
}


def _simulator_digest() -> str:
    """sha256 of the simulator's source: series simulated by other code are not reused."""
    digest = hashlib.sha256()
    for path in sorted(Path(simulation.__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _folders(spec: Spec) -> dict[str, str]:
    """Folder key -> domain: ``source`` and ``target``, or every domain by its name."""
    if spec.domains:
        return {domain: domain for domain in spec.domains}
    return {"source": spec.source, "target": spec.target}


def simulate(spec: Spec, root: Path) -> dict[str, Path]:
    """Train and test folders for both domains (skips series already simulated by this
    version of the simulator; simulates everything again when the simulator changed)."""
    stamp, digest = root / "simulator.sha256", _simulator_digest()
    root.mkdir(parents=True, exist_ok=True)
    if not stamp.is_file() or stamp.read_text().strip() != digest:
        for old in (p for p in root.iterdir() if p.name.startswith(("train-", "test-"))):
            shutil.rmtree(old)
        stamp.write_text(digest + "\n")
    plan = {f"train-{key}": (domain, spec.subjects(domain), spec.train_sizes)
            for key, domain in _folders(spec).items()}
    for size in set(spec.sizes().values()):
        plan.update({f"test-{key}-{size}": (domain, TEST_SUBJECTS, (size,))
                     for key, domain in _folders(spec).items()})
    folders = {}
    for key, (domain, subjects, sizes) in plan.items():
        folders[key] = root / key
        wanted = {f"{domain}-{subject:03d}-{size}": (subject, size)
                  for subject in subjects for size in sizes}
        if folders[key].is_dir():  # series of an earlier plan would be trained on too
            for stale in set(p.name for p in folders[key].iterdir()) - set(wanted):
                shutil.rmtree(folders[key] / stale)
        for name, (subject, size) in wanted.items():
            out = folders[key] / name
            if not out.is_dir():   # written aside and renamed: an interrupted run leaves none
                partial = out.with_name(out.name + ".partial")
                simulate_series(spec.modality, domain, partial, subject=subject, slices=SLICES,
                                size=size, progress=False)
                partial.rename(out)
    return folders


def _run(command: list[str], capture: bool = False) -> str:
    print("$ " + shlex.join(command), file=sys.stderr, flush=True)
    # a command's own output goes to stderr: ship_models' stdout is the results' JSON
    done = subprocess.run(command, check=True, text=True,
                          stdout=subprocess.PIPE if capture else sys.stderr)
    return done.stdout or ""


def build(name: str, work: Path, models_dir: Path, train: bool = True) -> dict:
    spec = MODELS[name]
    folders = simulate(spec, work / name)
    dicomnode = [sys.executable, "-m", "dicomnode.cli"]
    common = ["--name", name, "--models-dir", str(models_dir), "--version", spec.version,
              "--seed", "0", "--device", "cpu", "--workdir", str(work / name / "run"),
              "--force", "--no-progress", *spec.args]
    if train and spec.domains:
        _run([*dicomnode, "train", spec.mode, *(a for d in spec.domains for a in (
            "--domain", f"{d}={folders[f'train-{d}']}")), *common])
    elif train:
        _run([*dicomnode, "train", spec.mode, "--source", str(folders["train-source"]),
              "--target", str(folders["train-target"]), "--source-domain", spec.source,
              "--target-domain", spec.target, *common])
    results = {}
    for evaluation, size in spec.sizes().items():
        data = [a for d in spec.domains for a in ("--domain", f"{d}={folders[f'test-{d}-{size}']}")
                ] if spec.domains else [
            "--source", str(folders[f"test-source-{size}"]),
            "--target", str(folders[f"test-target-{size}"])]
        out = _run([*dicomnode, "evaluate", "--model", name, "--models-dir", str(models_dir),
                    *data, "--report", str(models_dir / name / "report" / evaluation)],
                   capture=True)
        results[evaluation] = json.loads(out)
    return results


def _cell(metrics: dict, key: str, digits: int) -> str:
    """``before -> after (histogram matching)`` for one metric of an evaluation."""
    value, base = metrics[key], metrics["baseline"][key]
    if key == "radiomics_ccc":
        numbers = (metrics["radiomics_ccc_before"]["texture_mean"], value["texture_mean"],
                   base["texture_mean"])
    elif key == "domain_accuracy":
        numbers = (metrics["domain_accuracy_before"], value, base)
    else:
        numbers = (value["before"], value["after"], base["after"])
    before, after, baseline = (f"{n:.{digits}f}" for n in numbers)
    return f"{before} → **{after}** ({baseline})"


def mean_of(results: list[Any]) -> Any:
    """The mean of equally shaped results (numbers averaged leaf by leaf; the first's value
    where a leaf is not a number in all of them)."""
    first = results[0]
    if isinstance(first, dict):
        return {k: mean_of([r[k] for r in results]) for k in first}
    if all(isinstance(r, int | float) and not isinstance(r, bool) for r in results):
        return sum(results) / len(results)
    return first


def _count(n: int) -> str:
    return f"{n / 1e3:.0f}k" if n >= 1000 else str(n)


def _file_size(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size >= 10_000 else f"{size / 1e3:.1f} kB"


def table(models_dir: Path, evaluation: str = "evaluation") -> str:
    """The README's table of the shipped models, from one of their evaluation reports."""
    rows = ["| model | training | SSIM | PSNR (dB) | texture radiomics CCC | domain accuracy"
            " | weights | CPU training |", "|---|---|---|---|---|---|---|---|"]
    for name, spec in MODELS.items():
        folder = models_dir / name
        if evaluation not in spec.reports or not (folder / "model.json").is_file():
            continue  # not evaluated there, or not built (yet)
        info = json.loads((folder / "model.json").read_text())
        metrics = json.loads((folder / "report" / evaluation / "metrics.json").read_text())
        size = (folder / info["weights"]).stat().st_size
        training = info["training"]
        matrices = " + ".join(f"{n}²" for n in spec.train_sizes)
        if "pixel_spacing" in info:  # resampled to the spacing the model works at
            matrices += f" at {info['pixel_spacing'][0]:g} mm"
        pair = f"{spec.source} → {spec.target}"
        if spec.domains:  # the mean of every other domain converted to the routes' target
            into = [m for p, m in metrics["pairs"].items() if p.endswith(f" -> {spec.target}")]
            metrics = mean_of(into)
            pair = f"each of {len(into)} scanners → {spec.target} (mean)"
        rows.append(
            f"| `{name}` | {spec.mode}, {info['architecture']}, {pair}"
            f", {matrices} | {_cell(metrics, 'ssim', 3)} | {_cell(metrics, 'psnr', 1)}"
            f" | {_cell(metrics, 'radiomics_ccc', 3)} | {_cell(metrics, 'domain_accuracy', 2)}"
            f" | {_count(training['parameters'])} params, {_file_size(size)}"
            f" | {training['steps']} steps, {training['seconds'] / 60:.0f} min |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=sorted(MODELS), action="append",
                   help="build only this model (repeatable)")
    p.add_argument("--work", type=Path, default=Path("runs/ship"),
                   help="simulated data and checkpoints")
    p.add_argument("--models-dir", type=Path, default=Path("models"))
    p.add_argument("--evaluate-only", action="store_true",
                   help="skip training; evaluate the model folders already there")
    p.add_argument("--table", action="store_true",
                   help="only print the README's markdown tables of the shipped models"
                        " (held out at the training matrix, then at the clinical one)")
    args = p.parse_args(argv)
    # the simulator's events go to stderr with the commands' own output
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    if args.table:
        print("\n\n".join(table(args.models_dir, report) for report in REPORTS))
        return 0
    results = {}
    for name in args.only or [n for n, spec in MODELS.items() if spec.shipped]:
        results[name] = build(name, args.work, args.models_dir, not args.evaluate_only)
        print(json.dumps({name: results[name]}, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
