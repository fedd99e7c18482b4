"""Paired training: the same raw data in two kernels, so the target is known per pixel.

The generator (by default CHAIMELEON's plain residual CNN) learns source -> target on
co-located patches with L1 (+ SSIM); validation is PSNR on held-out pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.networks import build_generator
from trainers.data import PatchSampler
from trainers.loop import Step, autocast
from trainers.losses import SSIMLoss, masked_l1
from trainers.options import CommonOptions, PairedOptions

VAL_PATCHES = 64
DATA_RANGE, DATA_LOW = 2.0, -1.0  # the normalised range [-1, 1] (pipelines.intensity)


@dataclass
class PairedData:
    """Normalised (D, H, W) volumes; ``*_target[i]`` is voxel-aligned with ``*_source[i]``."""

    train_source: Sequence[np.ndarray]
    train_target: Sequence[np.ndarray]
    train_masks: Sequence[np.ndarray]
    val_source: Sequence[np.ndarray]
    val_target: Sequence[np.ndarray]
    val_masks: Sequence[np.ndarray]


def generator_params(options: CommonOptions) -> dict:
    """The generator's constructor parameters: ``--param`` values plus ``--dims``."""
    return {**options.param, "dims": options.dims}


def paired_step(data: PairedData, options: PairedOptions, device: torch.device) -> Step:
    """Modules, optimiser, one L1 (+SSIM) step and a PSNR/SSIM validation on held-out pairs."""
    generator = build_generator(options.architecture, generator_params(options)).to(device)
    optim = torch.optim.Adam(generator.parameters(), lr=options.lr, betas=(0.9, 0.999))
    sampler = PatchSampler(data.train_source, data.train_masks, options.patch, options.dims,
                           seed=options.seed, partners=data.train_target)
    val_x, val_y = PatchSampler(data.val_source, data.val_masks, options.patch, options.dims,
                                seed=options.seed + 1, partners=data.val_target,
                                flip=False).sample(VAL_PATCHES)
    assert val_y is not None
    ssim_loss = SSIMLoss(DATA_RANGE, DATA_LOW)

    def train(_: int) -> dict[str, float]:
        x, y = sampler.sample(options.batch)
        x, y = x.to(device), y.to(device)
        with autocast(device):
            out = generator(x)
        l1 = masked_l1(out, y)
        loss = options.l1 * l1
        losses = {"l1": l1.item()}
        if options.ssim > 0:
            s = ssim_loss(out, y)
            loss = loss + options.ssim * s
            losses["ssim_loss"] = s.item()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        return {**losses, "loss": loss.item()}

    def validate() -> dict[str, float]:
        out = torch.cat([generator(part.to(device)).float().cpu()
                         for part in torch.split(val_x, options.batch)])
        mse = float(((out - val_y) ** 2).mean())
        return {"psnr": 10 * float(np.log10(DATA_RANGE ** 2 / max(mse, 1e-12))),
                "ssim": 1 - float(ssim_loss(out, val_y)),
                "l1": float((out - val_y).abs().mean())}

    return Step(modules={"generator": generator}, optimizers={"generator": optim}, train=train,
                validate=validate, generator="generator", score="psnr", higher=True,
                state=lambda: {"sampler": sampler.rng.bit_generator.state},
                load=lambda s: setattr(sampler.rng.bit_generator, "state", s["sampler"]))
