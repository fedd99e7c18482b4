"""Unpaired training: CycleGAN (Zhu et al.) with the harmonisation literature's additions.

Two generators (source->target, target->source), two PatchGAN discriminators, LSGAN
(default) or WGAN-GP adversarial loss, cycle and identity L1 losses, optional SSIM
between each input and its translation (anatomy must not move), optional Gram texture
("domain") loss on a frozen scanner classifier's features (CVS-CT), and an image pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipelines.networks import build_generator
from trainers.data import PatchSampler
from trainers.discriminators import PatchGAN
from trainers.domain_classifier import DomainClassifier, balanced_accuracy
from trainers.loop import Step, autocast
from trainers.losses import (
    AdversarialLoss,
    GramTextureLoss,
    SpectrumLoss,
    SSIMLoss,
    gradient_penalty,
    log_radial_power,
    lowpass,
    spectrum_error,
)
from trainers.options import UnpairedOptions
from trainers.paired import DATA_LOW, DATA_RANGE, VAL_PATCHES, generator_params


@dataclass
class UnpairedData:
    """Normalised (D, H, W) volumes of each domain with body masks; no correspondence."""

    train_source: Sequence[np.ndarray]
    train_source_masks: Sequence[np.ndarray]
    train_target: Sequence[np.ndarray]
    train_target_masks: Sequence[np.ndarray]
    val_source: Sequence[np.ndarray]
    val_source_masks: Sequence[np.ndarray]
    val_target: Sequence[np.ndarray]
    val_target_masks: Sequence[np.ndarray]

    def samplers(self, patch: int, dims: int, seed: int) -> tuple[PatchSampler, PatchSampler]:
        return (PatchSampler(self.train_source, self.train_source_masks, patch, dims, seed),
                PatchSampler(self.train_target, self.train_target_masks, patch, dims, seed + 7))


class ImagePool:
    """Shrivastava et al.'s history buffer: discriminators also see older fakes.

    Half of each query is swapped for stored images, which damps the oscillation of
    generator and discriminator chasing each other's latest move.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.images: list[torch.Tensor] = []
        self.rng = np.random.default_rng(seed)

    def query(self, batch: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return batch
        out = []
        for image in batch.detach():
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif self.rng.random() < 0.5:
                i = int(self.rng.integers(self.size))
                out.append(self.images[i].clone())
                self.images[i] = image.clone()
            else:
                out.append(image)
        return torch.stack(out)


def wasserstein1(x: torch.Tensor, y: torch.Tensor, quantiles: int = 512) -> float:
    """Earth mover's distance between two intensity distributions (via quantiles)."""
    q = torch.linspace(0, 1, quantiles)
    return float((torch.quantile(x.flatten().float()[:2 ** 24], q)
                  - torch.quantile(y.flatten().float()[:2 ** 24], q)).abs().mean())


def requires_grad(modules: Sequence[nn.Module], flag: bool) -> None:
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(flag)


def unpaired_step(data: UnpairedData, options: UnpairedOptions, features: DomainClassifier,
                  device: torch.device) -> Step:
    """CycleGAN modules and step; ``features`` is the frozen classifier for Gram/validation.

    Validation on held-out patches: intensity Wasserstein-1 and Gram distance of
    translated source vs real target, and with ``--spectrum`` the spectrum error
    (:func:`~trainers.losses.spectrum_error`, the held-out domains' log power ratio
    wanted), each relative to the untranslated source (so 1.0 = no harmonisation). Their
    sum ``domain_distance`` selects the best checkpoint; with ``--spectrum`` and no
    ``--gram`` the Gram term is only logged: the features it compares are a classifier's,
    trained for another purpose, and need not move with the texture the training matches.
    The classifier's balanced accuracy (0.5 = indistinguishable) is logged alongside.
    """
    params = generator_params(options)
    g_ab = build_generator(options.architecture, params).to(device)
    g_ba = build_generator(options.architecture, params).to(device)
    d_a, d_b = (PatchGAN(1, options.disc_features, options.disc_layers, options.dims).to(device)
                for _ in range(2))
    betas = (0.5, 0.999) if options.gan == "lsgan" else (0.0, 0.9)
    opt_g = torch.optim.Adam([*g_ab.parameters(), *g_ba.parameters()], options.lr, betas=betas)
    opt_d = torch.optim.Adam([*d_a.parameters(), *d_b.parameters()], options.lr, betas=betas)
    gan = AdversarialLoss(options.gan)
    ssim_loss = SSIMLoss(DATA_RANGE, DATA_LOW)
    gram_loss = GramTextureLoss(features.features)
    spectrum_loss = SpectrumLoss()
    l1 = nn.L1Loss()

    def round_trip(output: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        """Cycle / identity L1, on low-passed images when ``--cycle-sigma`` is set."""
        return l1(lowpass(output.float(), options.cycle_sigma),
                  lowpass(original, options.cycle_sigma))
    sample_a, sample_b = data.samplers(options.patch, options.dims, options.seed)
    pool_a, pool_b = ImagePool(options.pool, options.seed), ImagePool(options.pool,
                                                                      options.seed + 1)
    val_a = PatchSampler(data.val_source, data.val_source_masks, options.patch, options.dims,
                         options.seed + 2, flip=False).sample(VAL_PATCHES)[0]
    val_b = PatchSampler(data.val_target, data.val_target_masks, options.patch, options.dims,
                         options.seed + 3, flip=False).sample(VAL_PATCHES)[0]
    reference: dict[str, float] = {}
    # the held-out domains' log power ratio, the spectrum error's aim (fixed patches)
    val_wanted = log_radial_power(val_b) - log_radial_power(val_a) if options.spectrum > 0 \
        else None

    def train(_: int) -> dict[str, float]:
        a = sample_a.sample(options.batch)[0].to(device)
        b = sample_b.sample(options.batch)[0].to(device)
        requires_grad([d_a, d_b], False)
        with autocast(device):
            fake_b, fake_a = g_ab(a), g_ba(b)
            adv = gan.generator(d_b(fake_b).float()) + gan.generator(d_a(fake_a).float())
            cycle = round_trip(g_ba(fake_b), a) + round_trip(g_ab(fake_a), b)
            loss = adv + options.cycle * cycle
            losses = {"g_adv": adv.item(), "cycle": cycle.item()}
            if options.identity > 0:
                idt = round_trip(g_ab(b), b) + round_trip(g_ba(a), a)
                loss = loss + options.identity * idt
                losses["identity"] = idt.item()
            if options.ssim > 0:
                s = ssim_loss(fake_b, a) + ssim_loss(fake_a, b)
                loss = loss + options.ssim * s
                losses["ssim_loss"] = s.item()
            if options.gram > 0:
                gr = gram_loss(fake_b, b) + gram_loss(fake_a, a)
                loss = loss + options.gram * gr
                losses["gram"] = gr.item()
            if options.spectrum > 0:
                spectrum_loss.observe("a", a)
                spectrum_loss.observe("b", b)
                sp = spectrum_loss(fake_b, a, "a", "b") + spectrum_loss(fake_a, b, "b", "a")
                loss = loss + options.spectrum * sp
                losses["spectrum"] = sp.item()
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()

        requires_grad([d_a, d_b], True)
        fb, fa = pool_b.query(fake_b.detach().float()), pool_a.query(fake_a.detach().float())
        with autocast(device):
            d_loss = (gan.discriminator(d_b(b).float(), d_b(fb).float())
                      + gan.discriminator(d_a(a).float(), d_a(fa).float()))
        if options.gan == "wgan-gp":
            d_loss = d_loss + options.gp * (gradient_penalty(d_b, b, fb)
                                            + gradient_penalty(d_a, a, fa))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        return {**losses, "g_total": loss.item(), "d": d_loss.item()}

    def validate() -> dict[str, float]:
        out = torch.cat([g_ab(part.to(device)).float().cpu()
                         for part in torch.split(val_a, options.batch)])
        cyc = torch.cat([g_ba(part.to(device)).float().cpu()
                         for part in torch.split(out, options.batch)])
        feats = features.to("cpu")
        w1 = wasserstein1(out, val_b)
        gram = float(GramTextureLoss(feats.features)(out, val_b))
        if not reference:
            reference.update(w1=max(wasserstein1(val_a, val_b), 1e-6),
                             gram=max(float(GramTextureLoss(feats.features)(val_a, val_b)),
                                      1e-12))
        features.to(device)
        rel_w1, rel_gram = w1 / reference["w1"], gram / reference["gram"]
        scores = {"rel_w1": rel_w1, "rel_gram": rel_gram}
        distance = rel_w1 + (rel_gram if options.gram > 0 or val_wanted is None else 0.0)
        if val_wanted is not None:
            scores["rel_spectrum"] = float(spectrum_error(out, val_a, val_wanted)
                                           / val_wanted.pow(2).mean().clamp_min(1e-12))
            distance += scores["rel_spectrum"]
        return {"domain_distance": distance, "w1": w1, "gram": gram, **scores,
                "domain_accuracy": balanced_accuracy(feats, [out, val_b]),
                "cycle_l1": float((cyc - val_a).abs().mean())}

    def state() -> dict:
        return {"a": sample_a.rng.bit_generator.state, "b": sample_b.rng.bit_generator.state,
                "pool_a": pool_a.images, "pool_b": pool_b.images,
                "spectrum": spectrum_loss.state()}

    def load(s: dict) -> None:
        sample_a.rng.bit_generator.state, sample_b.rng.bit_generator.state = s["a"], s["b"]
        pool_a.images, pool_b.images = s["pool_a"], s["pool_b"]
        spectrum_loss.load(s.get("spectrum", {"sums": {}, "counts": {}}))

    return Step(modules={"g_ab": g_ab, "g_ba": g_ba, "d_a": d_a, "d_b": d_b},
                optimizers={"g": opt_g, "d": opt_d}, train=train, validate=validate,
                generator="g_ab", score="domain_distance", higher=False, state=state, load=load)
