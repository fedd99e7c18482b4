"""Multi-domain training: StarGAN v2 (Choi et al. 2020) for scanner harmonisation.

One style generator ``G(x, s)`` (:class:`pipelines.networks.StyleUNet`) converts an image of
any domain into the domain whose style ``s`` it is given. A step picks a source domain ``a``
and a target domain ``b`` (``--reference-share`` of the steps: ``b`` is the first domain, the
one the routes convert to), a batch of ``a`` patches and one of ``b`` patches (unpaired), and a
target style: from the mapping network (a latent code), from the style encoder (the ``b``
patches as reference) or, as the node will, ``b``'s running mean style (``--mean-style``).
Losses: adversarial (the multi-task discriminator's ``b`` branch), style reconstruction
``|E(G(x, s), b) - s|``, cycle ``G(G(x, s), E(x, a)) = x`` and identity ``G(x, E(x, a)) = x``,
optional SSIM between input and output, Gram texture (a frozen N-way scanner classifier's
features) and noise-power-spectrum terms as in unpaired training; the diversity loss is off
unless asked for, since a harmonised series must not depend on a random code.

Each validation writes every domain's **reference style** into the generator: the style
encoder's mean over fixed patches of each training series, averaged over the series. The
generator kept (the best validation's) therefore carries the styles it was scored with, and the
node converts to a domain with them, deterministically and without a reference image.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.intensity import normalise
from pipelines.model_folder import DomainStyle, save_model_folder
from pipelines.networks import (
    GENERATORS,
    StyleUNet,
    build_generator,
    count_parameters,
    is_styled,
)
from trainers import report
from trainers.data import PatchSampler, Series, at_pixel_spacing, normalisation_for, split_holdout
from trainers.discriminators import DISCRIMINATORS
from trainers.domain_classifier import DomainClassifier, train_classifier
from trainers.loop import FitResult, Step, autocast, fit, seed_everything, select_device
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
from trainers.metrics import metric_unit_name, metric_units
from trainers.options import MultiDomainOptions, summary
from trainers.paired import DATA_LOW, DATA_RANGE, generator_params
from trainers.style import MAPPING_NETWORKS, STYLE_ENCODERS, build_network
from trainers.train import (
    FEATURE_NET,
    Log,
    TrainingError,
    TrainOutcome,
    describe_domain,
    harmonise_array,
)
from trainers.unpaired import ImagePool, requires_grad, wasserstein1

VAL_PATCHES = 32        # held-out patches per domain for validation (one forward pass)
STYLE_PATCHES = 16      # fixed patches per training series for its reference style


@dataclass
class DomainData:
    """One domain's normalised (D, H, W) volumes and body masks, split by series."""

    name: str
    train: list[np.ndarray]
    train_masks: list[np.ndarray]
    val: list[np.ndarray]
    val_masks: list[np.ndarray]


def _sampler(volumes: Sequence[np.ndarray], masks: Sequence[np.ndarray],
             options: MultiDomainOptions, seed: int, flip: bool = True) -> PatchSampler:
    return PatchSampler(volumes, masks, options.patch, options.dims, seed, flip=flip)


def style_params(options: MultiDomainOptions, domains: int) -> dict[str, Any]:
    """The style generator's constructor parameters."""
    return {**generator_params(options), "style_dim": options.style_dim, "domains": domains}


@torch.no_grad()
def reference_styles(encoder: nn.Module, patches: Sequence[Sequence[torch.Tensor]],
                     device: torch.device, chunk: int = 32) -> torch.Tensor:
    """(domains, style_dim): per domain, the mean over its series of the mean style code of
    each series' patches (``patches[domain][series]``)."""
    out = []
    for k, series in enumerate(patches):
        codes = [torch.cat([encoder(part.to(device), k).float()
                            for part in torch.split(p, chunk)]).mean(0) for p in series]
        out.append(torch.stack(codes).mean(0))
    return torch.stack(out).cpu()


def multidomain_step(domains: Sequence[DomainData], options: MultiDomainOptions,
                     features: DomainClassifier, device: torch.device) -> Step:
    """Generator, mapping network, style encoder, multi-task discriminator and one step.

    Validation converts each domain's held-out patches to every other domain with its
    reference style and scores, per ordered pair, the intensity Wasserstein-1 to the target
    domain's held-out patches relative to the unconverted ones (1.0 = no harmonisation), with
    ``--spectrum`` the spectrum error and with ``--gram`` the Gram distance the same way;
    their mean over pairs, ``domain_distance``, picks the best checkpoint. Logged beside it:
    ``target_accuracy``, the share of outputs the frozen N-way classifier assigns to their
    target domain, and the round trip's L1.
    """
    n = len(domains)
    if not is_styled(options.architecture):
        raise TrainingError(f"architecture '{options.architecture}' is not a style generator"
                            f" (known: {', '.join(a for a in GENERATORS if is_styled(a))})")
    g = build_generator(options.architecture, style_params(options, n)).to(device)
    mapping = build_network(MAPPING_NETWORKS, options.mapping, "mapping network",
                            latent_dim=options.latent_dim, style_dim=options.style_dim,
                            domains=n).to(device)
    encoder = build_network(STYLE_ENCODERS, options.style_encoder, "style encoder",
                            features=options.encoder_features, style_dim=options.style_dim,
                            domains=n, dims=options.dims).to(device)
    disc = build_network(DISCRIMINATORS, options.discriminator, "discriminator",
                         features=options.disc_features, layers=options.disc_layers,
                         dims=options.dims, domains=n).to(device)
    betas = (0.5, 0.999) if options.gan == "lsgan" else (0.0, 0.9)
    opt_g = torch.optim.Adam([*g.parameters(), *mapping.parameters(), *encoder.parameters()],
                             options.lr, betas=betas)
    opt_d = torch.optim.Adam(disc.parameters(), options.lr, betas=betas)
    gan = AdversarialLoss(options.gan)
    ssim_loss = SSIMLoss(DATA_RANGE, DATA_LOW)
    gram_loss = GramTextureLoss(features.features)
    spectrum_loss = SpectrumLoss()
    l1 = nn.L1Loss()
    samplers = [_sampler(d.train, d.train_masks, options, options.seed + 13 * k)
                for k, d in enumerate(domains)]
    pools = [ImagePool(options.pool, options.seed + k) for k in range(n)]
    rng = np.random.default_rng(options.seed + 5)
    style_patches = [[_sampler([v], [m], options, options.seed + 17 * k + j, flip=False)
                      .sample(STYLE_PATCHES)[0] for j, (v, m) in enumerate(zip(
                          d.train, d.train_masks, strict=True))] for k, d in enumerate(domains)]
    val = [_sampler(d.val, d.val_masks, options, options.seed + 29 * k + 3, flip=False)
           .sample(VAL_PATCHES)[0] for k, d in enumerate(domains)]
    running = reference_styles(encoder, style_patches, device).to(device)
    pairs = [(a, b) for a in range(n) for b in range(n) if a != b]
    reference = {(a, b): max(wasserstein1(val[a], val[b]), 1e-6) for a, b in pairs}
    wanted = {(a, b): log_radial_power(val[b]) - log_radial_power(val[a]) for a, b in pairs} \
        if options.spectrum > 0 else {}

    def round_trip(output: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        return l1(lowpass(output.float(), options.cycle_sigma),
                  lowpass(original, options.cycle_sigma))

    def target_style(step: int, b: int, ref: torch.Tensor) -> torch.Tensor:
        """The running mean (``--mean-style`` of the steps), else mapping and encoder in turn."""
        if rng.random() < options.mean_style:
            return running[b].expand(len(ref), -1)
        if step % 2 == 0:
            z = torch.randn(len(ref), options.latent_dim, device=device)
            return mapping(z, b)
        return encoder(ref, b)

    def pair() -> tuple[int, int]:
        """Source and target domain of one step (``--reference-share``: into the first)."""
        if rng.random() < options.reference_share:
            return int(rng.integers(1, n)), 0
        a, b = rng.choice(n, size=2, replace=False)
        return int(a), int(b)

    def train(step: int) -> dict[str, float]:
        a, b = pair()
        x = samplers[a].sample(options.batch)[0].to(device)
        ref = samplers[b].sample(options.batch)[0].to(device)
        requires_grad([disc], False)
        with autocast(device):
            s_trg = target_style(step, b, ref)
            fake = g(x, s_trg)
            adv = gan.generator(disc(fake, b).float())
            sty = l1(encoder(fake, b).float(), s_trg.float())
            s_org = encoder(x, a)
            cycle = round_trip(g(fake, s_org), x)
            loss = adv + options.style * sty + options.cycle * cycle
            losses = {"g_adv": adv.item(), "style": sty.item(), "cycle": cycle.item()}
            if options.identity > 0:
                idt = round_trip(g(x, s_org), x)
                loss = loss + options.identity * idt
                losses["identity"] = idt.item()
            if options.ssim > 0:
                s = ssim_loss(fake, x)
                loss = loss + options.ssim * s
                losses["ssim_loss"] = s.item()
            if options.gram > 0:
                gr = gram_loss(fake, ref)
                loss = loss + options.gram * gr
                losses["gram"] = gr.item()
            if options.spectrum > 0:
                spectrum_loss.observe(str(a), x)
                spectrum_loss.observe(str(b), ref)
                sp = spectrum_loss(fake, x, str(a), str(b))
                loss = loss + options.spectrum * sp
                losses["spectrum"] = sp.item()
            if options.diversity > 0:
                other = g(x, mapping(torch.randn(len(x), options.latent_dim, device=device), b))
                div = (fake.float() - other.float()).abs().mean()
                loss = loss - options.diversity * div
                losses["diversity"] = div.item()
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        with torch.no_grad():  # the running mean style follows the encoder
            running[b] = 0.99 * running[b] + 0.01 * encoder(ref, b).float().mean(0)

        requires_grad([disc], True)
        pooled = pools[b].query(fake.detach().float())
        with autocast(device):
            d_loss = gan.discriminator(disc(ref, b).float(), disc(pooled, b).float())
        if options.gan == "wgan-gp":
            d_loss = d_loss + options.gp * gradient_penalty(
                lambda t: disc(t, b), ref, pooled)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        return {**losses, "g_total": loss.item(), "d": d_loss.item()}

    def validate() -> dict[str, float]:
        styles = reference_styles(encoder, style_patches, device)
        g.styles.copy_(styles.to(g.styles.device))
        feats = features.to("cpu")
        scores: dict[str, list[float]] = {"rel_w1": [], "rel_gram": [], "rel_spectrum": [],
                                          "target_accuracy": [], "cycle_l1": []}
        distance = []
        for a, b in pairs:
            out = g(val[a].to(device), styles[b].to(device)).float().cpu()
            back = g(out.to(device), styles[a].to(device)).float().cpu()
            rel = {"rel_w1": wasserstein1(out, val[b]) / reference[(a, b)]}
            if options.gram > 0:
                gram = GramTextureLoss(feats.features)
                rel["rel_gram"] = float(gram(out, val[b])) / max(float(gram(val[a], val[b])),
                                                                1e-12)
            if options.spectrum > 0:
                want = wanted[(a, b)]
                rel["rel_spectrum"] = float(spectrum_error(out, val[a], want)
                                            / want.pow(2).mean().clamp_min(1e-12))
            distance.append(sum(rel.values()))
            for k, v in rel.items():
                scores[k].append(v)
            with torch.no_grad():
                scores["target_accuracy"].append(float((feats(out).argmax(1) == b)
                                                       .float().mean()))
            scores["cycle_l1"].append(float((back - val[a]).abs().mean()))
        features.to(device)
        return {"domain_distance": float(np.mean(distance)),
                **{k: float(np.mean(v)) for k, v in scores.items() if v}}

    def state() -> dict:
        return {"samplers": [s.rng.bit_generator.state for s in samplers],
                "rng": rng.bit_generator.state, "pools": [p.images for p in pools],
                "running": running.cpu(), "spectrum": spectrum_loss.state()}

    def load(s: dict) -> None:
        for sampler, st in zip(samplers, s["samplers"], strict=True):
            sampler.rng.bit_generator.state = st
        rng.bit_generator.state = s["rng"]
        for pool, images in zip(pools, s["pools"], strict=True):
            pool.images = images
        running.copy_(s["running"].to(device))
        spectrum_loss.load(s["spectrum"])

    return Step(modules={"g": g, "mapping": mapping, "encoder": encoder, "d": disc},
                optimizers={"g": opt_g, "d": opt_d}, train=train, validate=validate,
                generator="g", score="domain_distance", higher=False, state=state, load=load)


def train_multidomain_series(options: MultiDomainOptions, domains: Mapping[str, Sequence[Series]],
                             folder: Path, log: Log = print) -> TrainOutcome:
    """StarGAN v2 on already loaded series, one list per domain (``train site`` selects them
    from the spool); writes the model folder with each domain's reference style."""
    if len(domains) < 2:
        raise TrainingError("multi-domain training needs at least two domains")
    names = list(domains)
    series = {k: at_pixel_spacing(v, options.pixel_spacing) for k, v in domains.items()}
    modality = series[names[0]][0].modality
    norm = normalisation_for(modality)
    data, held, trained = [], {}, {}
    for k, name in enumerate(names):
        try:
            train_idx, val_idx = split_holdout(len(series[name]), options.holdout,
                                               options.seed + k)
        except ValueError as exc:
            raise TrainingError(f"domain {name}: {exc}") from None
        arrays = [normalise(s.volume.array, norm)[0] for s in series[name]]
        masks = [s.mask for s in series[name]]
        data.append(DomainData(name, [arrays[i] for i in train_idx],
                               [masks[i] for i in train_idx], [arrays[i] for i in val_idx],
                               [masks[i] for i in val_idx]))
        held[name] = [series[name][i] for i in val_idx]
        trained[name] = len(train_idx)
        log(f"domain {name}: {len(train_idx)} series for training, {len(val_idx)} held out")
    seed_everything(options.seed)
    device = select_device(options.device)
    log(f"training the Gram/validation feature network ({options.feature_steps} steps,"
        f" {len(names)} scanners)")
    features = train_classifier([_sampler(d.train, d.train_masks, options, options.seed + 11 + k)
                                 for k, d in enumerate(data)], steps=options.feature_steps,
                                features=FEATURE_NET["features"], seed=options.seed,
                                device=device)
    result = fit(multidomain_step(data, options, features, device), options, log)
    generator = _save(options, folder, result, series, trained, log)
    _write_report(folder, result, modality, generator, held, options, device)
    return TrainOutcome(folder, result.best, result, {})


def _save(options: MultiDomainOptions, folder: Path, result: FitResult,
          series: Mapping[str, Sequence[Series]], trained: Mapping[str, int],
          log: Log) -> StyleUNet:
    params = style_params(options, len(series))
    generator = build_generator(options.architecture, params)
    generator.load_state_dict(result.generator_state)
    generator.eval()
    styles = [DomainStyle(name, tuple(float(v) for v in generator.styles[k]),
                          {t: v for t, v in describe_domain(name, s).items() if t != "name"},
                          trained[name]) for k, (name, s) in enumerate(series.items())]
    if folder.exists():
        shutil.rmtree(folder)
    names = ", ".join(series)
    training = {"mode": "multidomain", "options": summary(options), "steps": result.steps,
                "seconds": round(result.seconds, 1), "stopped_by": result.stopped,
                "best_step": result.best_step, "parameters": count_parameters(generator),
                "series": {name: len(s) for name, s in series.items()},
                "feature_network": {**FEATURE_NET, "steps": options.feature_steps,
                                    "trained_on": "training patches of every domain, labelled"
                                                  " by scanner (N-way)"},
                "reference_style": "mean over the domain's training series of the style"
                                   " encoder's mean code over fixed patches of each"}
    modality = next(iter(series.values()))[0].modality
    save_model_folder(folder, generator, name=options.name, version=options.version,
                      architecture=options.architecture, params=params,
                      source={"name": f"any of {names}", "Modality": modality},
                      target={"name": "the route's target_domain", "Modality": modality,
                              "domains": list(series)},
                      normalisation=normalisation_for(modality).to_spec(),
                      training=training,
                      validation={"best": result.best, "step": result.best_step},
                      pixel_spacing=(options.pixel_spacing,) * 2 if options.pixel_spacing
                      else None, styles=styles)
    log(f"wrote {folder} (domains {names}; best validation at step {result.best_step}: "
        + ", ".join(f"{k}={v:.4g}" for k, v in result.best.items()) + ")")
    return generator


def _write_report(folder: Path, result: FitResult, modality: str, generator: StyleUNet,
                  held: Mapping[str, Sequence[Series]], options: MultiDomainOptions,
                  device: torch.device) -> None:
    """Losses, and each domain's first held-out series (middle slice) converted to every
    domain (one row per source domain); histograms of every held-out series as it is and
    converted to the first domain."""
    out = folder / "report"
    out.mkdir(exist_ok=True)
    report.plot_losses(result.history, out / "losses.png")
    report.write_history(out / "history.csv", result.history)
    names = list(held)
    norm = normalisation_for(modality)
    rows, hist = [], {}
    for name in names:
        s = held[name][0]
        z = len(s.volume.array) // 2
        converted = [metric_units(harmonise_array(generator.for_domain(k), s.volume.array,
                                                  norm, options.dims, device), modality)
                     for k in range(len(names))]
        before = metric_units(s.volume.array, modality)
        rows.append([before[z], *(c[z] for c in converted)])
        hist[name] = before[s.mask]
        if name != names[0]:
            hist[f"{name} -> {names[0]}"] = converted[0][s.mask]
    report.plot_grid(rows, ["as acquired", *(f"to {n}" for n in names)],
                     out / "comparison.png", report.display_window(modality, rows[0][0]),
                     labels=names)
    report.plot_histograms(hist, out / "histograms.png", metric_unit_name(modality))
    report.write_json(out / "metrics.json", {
        "validation_best": result.best, "best_step": result.best_step, "steps": result.steps,
        "seconds": result.seconds, "domains": names})
