"""The training loop both modes share: device, seeds, budget, checkpoints, validation.

A mode supplies a :class:`Step` (its modules, optimisers, one training step and one
validation pass); :func:`fit` runs it with resumable checkpoints, a progress bar with
losses and ETA, a wall-clock budget, a linear learning-rate decay over the second half
(as CycleGAN) and keeps the generator weights of the best validation score.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from trainers.options import CommonOptions

CHECKPOINT = "checkpoint.pt"


def select_device(choice: str) -> torch.device:
    """``auto`` picks CUDA when torch sees a GPU, else the CPU."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch sees no CUDA device")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA (AMP without a loss scaler); full precision on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Step:
    """What a training mode plugs into :func:`fit`.

    ``train(step)`` runs one optimisation step and returns its losses by name;
    ``validate()`` returns metrics, of which ``score`` picks the best checkpoint
    (``higher`` says in which direction); ``generator`` is the module shipped.
    ``state``/``load`` carry extra resumable state (samplers' random generators).
    """

    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    train: Callable[[int], dict[str, float]]
    validate: Callable[[], dict[str, float]]
    generator: str
    score: str
    higher: bool
    state: Callable[[], dict[str, Any]] = dict
    load: Callable[[dict[str, Any]], None] = lambda _: None


@dataclass
class FitResult:
    """The best generator weights and everything the report and model.json need."""

    generator_state: dict[str, torch.Tensor]
    best: dict[str, float]
    best_step: int
    steps: int
    seconds: float
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    stopped: str = "steps"


def _decay(total: int) -> Callable[[int], float]:
    half = total // 2
    return lambda step: 1.0 if step < half else max(0.0, 1.0 - (step - half) / max(total - half,
                                                                                   1))


def _better(new: float, old: float | None, higher: bool) -> bool:
    if old is None or not math.isfinite(old):
        return math.isfinite(new)
    return new > old if higher else new < old


def fit(step: Step, options: CommonOptions, log: Callable[[str], None] = print) -> FitResult:
    """Train until ``options.steps`` or ``options.minutes``; resumable from ``run_dir``."""
    run_dir = options.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / CHECKPOINT
    schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, _decay(options.steps))
                  for k, o in step.optimizers.items()}
    history: dict[str, list[tuple[int, float]]] = {}
    best: dict[str, float] = {}
    best_state = copy.deepcopy(step.modules[step.generator].state_dict())
    best_step, start, spent = 0, 0, 0.0
    if options.resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        for k, m in step.modules.items():
            m.load_state_dict(ckpt["modules"][k])
        for k, o in step.optimizers.items():
            o.load_state_dict(ckpt["optimizers"][k])
            schedulers[k].load_state_dict(ckpt["schedulers"][k])
        step.load(ckpt["extra"])
        torch.set_rng_state(ckpt["torch_rng"])
        history, best, best_step = ckpt["history"], ckpt["best"], ckpt["best_step"]
        best_state, start, spent = ckpt["best_state"], ckpt["step"], ckpt["seconds"]
        log(f"resumed at step {start} from {ckpt_path}")

    def checkpoint(at: int, seconds: float) -> None:
        state = {"step": at, "seconds": seconds, "history": history, "best": best,
                 "best_step": best_step, "best_state": best_state,
                 "modules": {k: m.state_dict() for k, m in step.modules.items()},
                 "optimizers": {k: o.state_dict() for k, o in step.optimizers.items()},
                 "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
                 "extra": step.state(), "torch_rng": torch.get_rng_state()}
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(ckpt_path)

    def validate(at: int) -> None:
        nonlocal best, best_step, best_state
        for m in step.modules.values():
            m.eval()
        with torch.no_grad():
            metrics = step.validate()
        for m in step.modules.values():
            m.train()
        for k, v in metrics.items():
            history.setdefault(f"val_{k}", []).append((at, float(v)))
        line = f"step {at} validation: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        (tqdm.write if options.progress else log)(line)
        if _better(metrics[step.score], best.get(step.score), step.higher):
            best, best_step = dict(metrics), at
            best_state = copy.deepcopy(step.modules[step.generator].state_dict())

    budget = options.minutes * 60 if options.minutes > 0 else math.inf
    began = time.monotonic() - spent
    stopped = "steps"
    if start == 0:
        validate(0)
    done = start
    bar = tqdm(total=options.steps, initial=start, disable=not options.progress,
               dynamic_ncols=True, desc=options.name or "train", unit="step")
    with bar:
        for at in range(start, options.steps):
            losses = step.train(at)
            for sched in schedulers.values():
                sched.step()
            done = at + 1
            for k, v in losses.items():
                history.setdefault(k, []).append((done, float(v)))
            shown = {k: f"{v:.4f}" for k, v in losses.items()}
            bar.set_postfix(shown, refresh=False)
            bar.update(1)
            over = time.monotonic() - began >= budget
            if done % options.val_every == 0 or done == options.steps or over:
                validate(done)
                checkpoint(done, time.monotonic() - began)
                shown[f"best_{step.score}"] = f"{best.get(step.score, math.nan):.4f}"
                bar.set_postfix(shown)
            if over:
                stopped = "minutes"
                break
    return FitResult(best_state, best, best_step, done, time.monotonic() - began, history,
                     stopped)
