"""Training options: one dataclass per mode, the single source for defaults and ``--help``.

Each field's ``metadata`` carries its help text (and choices); :func:`add_arguments`
turns a dataclass into argparse options and :func:`from_args` back into the dataclass,
so the CLI, the Python API and ``model.json``'s training summary cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def _opt(default: Any, help: str, **extra: Any) -> Any:  # noqa: A002 - argparse's word
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default),
                     metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


def _millimetres(text: str) -> float:
    """A non-negative, finite length in mm (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a length in mm (0 or more), got {text!r}")
    return value


@dataclass
class CommonOptions:
    """What every training mode shares: data, model folder, budget, optimisation."""

    source: Path | None = _opt(None, "folder of source-domain DICOM series")
    target: Path | None = _opt(None, "folder of target-domain DICOM series")
    name: str = _opt("", "model name: the folder written under --models-dir")
    source_domain: str = _opt("", "source domain name for model.json (default: from tags)")
    target_domain: str = _opt("", "target domain name for model.json (default: from tags)")
    models_dir: Path = _opt(Path("models"), "where the model folder is written (default: the"
                            " node config's models_dir)", show_default=False)
    version: str = _opt("1.0", "model version recorded in model.json")
    architecture: str = _opt("plain", "generator architecture (pipelines.networks registry)")
    dims: int = _opt(2, "2 (slices) or 3 (volumes)", choices=(2, 3))
    param: dict[str, Any] = _opt({}, "generator parameter KEY=VALUE (repeatable), e.g."
                                 " features=32 blocks=8 cbam=2")
    pixel_spacing: float = _opt(0.0, "in-plane pixel spacing (mm) the model works at: training"
                                " series are resampled to it, and the node resamples every series"
                                " it harmonises to it and back; 0 = each series' own grid",
                                type=_millimetres)
    patch: int = _opt(64, "patch edge in pixels (3D: depth min(patch, slices))")
    batch: int = _opt(16, "patches per step")
    steps: int = _opt(2000, "optimiser steps (the learning rate decays over the last half)")
    minutes: float = _opt(0.0, "wall-clock budget in minutes; 0 = none (stops cleanly)")
    lr: float = _opt(2e-4, "Adam learning rate")
    seed: int = _opt(0, "random seed (patches, initialisation, held-out split)")
    holdout: float = _opt(0.2, "fraction of series held out for validation and the report")
    val_every: int = _opt(100, "validate every N steps; the best validation score is kept")
    device: str = _opt("auto", "auto (CUDA when present) | cpu | cuda",
                       choices=("auto", "cpu", "cuda"))
    resume: bool = _opt(False, "continue from the checkpoint in --workdir")
    workdir: Path | None = _opt(None, "checkpoints and logs (default: runs/NAME)")
    progress: bool = _opt(True, "show a progress bar with losses and ETA")
    force: bool = _opt(False, "replace an existing model folder of this name")

    @property
    def run_dir(self) -> Path:
        return self.workdir or Path("runs") / self.name


@dataclass
class PairedOptions(CommonOptions):
    """Paired training: the same raw data reconstructed in two kernels."""

    l1: float = _opt(1.0, "weight of the L1 loss")
    ssim: float = _opt(0.5, "weight of the SSIM loss (0 = off)")
    tolerance: float = _opt(0.01, "slice position tolerance (mm) when pairing slices")
    teacher: Path | None = _opt(None, "distil: a model folder whose outputs on the --source"
                                " series are the targets (--target is then not needed); the"
                                " model inherits its target domain and grain")


@dataclass
class SyntheticOptions(PairedOptions):
    """Pairs synthesised from unpaired series: the source scanner's acquisition, fitted on
    both scanners' series, run on the target series (:mod:`trainers.acquisition`)."""

    architecture: str = _opt("unet", "generator architecture (pipelines.networks registry)")
    draws: int = _opt(4, "synthetic source series per target series (noise draws)")
    fit_steps: int = _opt(400, "optimiser steps of the acquisition fit")
    grain: float = _opt(-1.0, "fraction of the target scanner's noise the node adds to the"
                        " output (MR); -1 = the least that makes the real source series'"
                        " output pass for the target scanner (a scanner classifier at"
                        " <= 0.6), 0 = none")


@dataclass
class UnpairedOptions(CommonOptions):
    """CycleGAN: two generators, two PatchGAN discriminators."""

    architecture: str = _opt("unet", "generator architecture (pipelines.networks registry)")
    gan: str = _opt("lsgan", "adversarial loss", choices=("lsgan", "wgan-gp"))
    cycle: float = _opt(10.0, "weight of the cycle-consistency L1 loss")
    identity: float = _opt(5.0, "weight of the identity L1 loss (CycleGAN: 0.5 x cycle)")
    cycle_sigma: float = _opt(0.0, "Gaussian sigma (pixels) of a low-pass on both sides of the"
                              " cycle and identity L1 losses, so that the source scanner's"
                              " noise need not survive the round trip (0 = plain L1)")
    ssim: float = _opt(0.0, "weight of the SSIM loss between input and output (0 = off)")
    gram: float = _opt(0.0, "weight of the Gram texture (domain) loss (0 = off)")
    spectrum: float = _opt(0.0, "weight of the noise-power-spectrum matching loss: log"
                           " radial power spectra of output and target patches (0 = off)")
    gp: float = _opt(10.0, "gradient penalty weight (wgan-gp)")
    disc_features: int = _opt(32, "PatchGAN width of its first layer")
    disc_layers: int = _opt(3, "PatchGAN stride-2 stages (3 = 70 px patches at 2D)")
    pool: int = _opt(50, "image pool size (Shrivastava et al.); 0 = off")
    feature_steps: int = _opt(300, "training steps of the Gram loss's feature network")


@dataclass
class MultiDomainOptions(UnpairedOptions):
    """StarGAN v2: one style-conditioned generator for every named scanner domain, a mapping
    network, a style encoder and a multi-task discriminator (:mod:`trainers.multidomain`)."""

    domain: dict[str, Any] = _opt({}, "a scanner domain and its folder of series, NAME=DIR"
                                  " (repeatable, at least two; the first is the training"
                                  " report's target)", metavar="NAME=DIR")
    architecture: str = _opt("stargan", "style generator architecture (pipelines.networks"
                             " registry)")
    style_dim: int = _opt(16, "length of a style code")
    latent_dim: int = _opt(16, "length of the mapping network's latent code")
    mapping: str = _opt("mlp", "mapping network (trainers.style registry)")
    style_encoder: str = _opt("conv", "style encoder (trainers.style registry)")
    encoder_features: int = _opt(16, "style encoder width of its first stage")
    discriminator: str = _opt("multitask", "discriminator (trainers.discriminators registry)")
    style: float = _opt(1.0, "weight of the style reconstruction loss")
    diversity: float = _opt(0.0, "weight of the style diversification loss (0 = off: a"
                            " harmonised series must not depend on a random code)")
    mean_style: float = _opt(0.5, "share of generator steps that translate with the target"
                             " domain's running mean style, as the node does; the rest use"
                             " the mapping network's and the style encoder's codes in turn")
    identity: float = _opt(5.0, "weight of the identity L1 loss: G(x, style of x's own"
                           " domain) = x")
    reference_share: float = _opt(0.0, "share of steps whose target is the first --domain"
                                  " (the one routes convert to), from another domain; the"
                                  " rest pick both domains at random (0 = every ordered pair"
                                  " alike)")


@dataclass
class SiteOptions(MultiDomainOptions, SyntheticOptions):
    """Per-site retraining from the node's own data, for one route (paired, unpaired,
    synthetic or multi-domain)."""

    architecture: str = _opt("", "generator architecture (default: the deployed model's,"
                             " else plain for paired, unet for unpaired and synthetic,"
                             " stargan for multi-domain)")
    route: str = _opt("", "route name in the node config")
    config: Path | None = _opt(None, "node config (default: $DICOMNODE_CONFIG or conf/node.toml)")
    pairing: str = _opt("auto", "auto (multidomain for a route with target_domain, paired"
                     " when series share a frame of reference, else the deployed model's mode:"
                     " synthetic or unpaired) | paired | unpaired | synthetic | multidomain",
                     choices=("auto", "paired", "unpaired", "synthetic", "multidomain"))
    compare: bool = _opt(True, "evaluate the new and the deployed model on the held-out series"
                         " (report/site-comparison.json)")


def _base_type(annotation: Any) -> Any:
    """``Path | None`` -> Path: the type argparse converts a string to."""
    hint = typing.get_origin(annotation)
    if hint in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: set[str] | None = None,
                  ) -> None:
    """Add one ``--option`` per dataclass field (``--no-x`` for true-by-default flags)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if skip and f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _base_type(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
            else f.default
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        elif typing.get_origin(kind) is dict:
            parser.add_argument(flag, action="append", type=_key_value, default=None,
                                metavar=f.metadata.get("metavar", "KEY=VALUE"), help=help_text)
        else:
            shown = f" (default: {default})" if default not in (None, "") and \
                f.metadata.get("show_default", True) else ""
            parser.add_argument(flag, type=f.metadata.get("type", kind), default=default,
                                choices=f.metadata.get("choices"), help=help_text + shown)


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build the options dataclass from parsed arguments (unknown attributes ignored)."""
    values = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if typing.get_origin(hints[f.name]) is dict:
            value = dict(value or [])
        values[f.name] = value
    return cls(**values)


def summary(options: Any) -> dict[str, Any]:
    """JSON-ready options for ``model.json``'s training summary (paths as strings)."""
    out = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        out[f.name] = str(value) if isinstance(value, Path) else value
    return out
