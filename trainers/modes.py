"""The training modes by name: the one registry ``dicomnode train MODE`` and ``train site`` use.

Each :class:`Mode` names its options dataclass (which drives the CLI, the API and
``model.json``), its help text, and the function that trains it on loaded series (writing
``folder``, the model folder). The trainer is named as ``module:function`` and imported on
first use: the CLI builds its parsers from this registry, and ``dicomnode --help`` must not
pay for importing torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trainers.options import (
    CommonOptions,
    MultiDomainOptions,
    PairedOptions,
    SiteOptions,
    SyntheticOptions,
    UnpairedOptions,
)


@dataclass(frozen=True)
class Mode:
    """One ``dicomnode train`` mode. ``trainer`` is ``module:function`` with the signature
    ``(options, sources, targets, folder, log) -> TrainOutcome`` (multi-domain: ``(options,
    domains, folder, log)``), or empty for a mode that selects its own data and delegates
    (``site``). ``skip``: options fields the mode's command line does not take."""

    options: type[CommonOptions]
    help: str
    trainer: str = ""
    skip: frozenset[str] = field(default_factory=frozenset)

    def train_series(self) -> Callable[..., Any]:
        """The trainer on loaded series (imported now)."""
        if not self.trainer:
            raise ValueError("this mode selects its own series; it has no series trainer")
        module, _, name = self.trainer.partition(":")
        return getattr(importlib.import_module(module), name)


MODES: dict[str, Mode] = {
    "paired": Mode(PairedOptions, "paired residual CNN / U-Net: the same raw data in two"
                   " kernels, series matched by FrameOfReferenceUID and slice position",
                   "trainers.train:train_paired_series"),
    "unpaired": Mode(UnpairedOptions, "CycleGAN (LSGAN or WGAN-GP, cycle, identity, optional"
                     " SSIM, CBAM and Gram texture loss) on two unpaired sets of series",
                     "trainers.train:train_unpaired_series"),
    "synthetic": Mode(SyntheticOptions, "MR: fit the source scanner's acquisition (contrast"
                      " curve, k-space window, receiver noise) on two unpaired sets of series,"
                      " synthesise source series from the target ones, train the paired recipe"
                      " on them and give back the target scanner's grain",
                      "trainers.synthetic:train_synthetic_series"),
    "multidomain": Mode(MultiDomainOptions, "StarGAN v2: one style-conditioned generator for"
                        " every --domain NAME=DIR (mapping network, style encoder, multi-task"
                        " discriminator; adversarial, style reconstruction, cycle and identity"
                        " losses, optional SSIM, Gram and spectrum terms); the model folder"
                        " keeps each domain's reference style, and a route names the domain"
                        " to convert to (target_domain)",
                        "trainers.multidomain:train_multidomain_series",
                        frozenset({"source", "target", "source_domain", "target_domain"})),
    # site derives the data, name and version from the route and the deployed model
    "site": Mode(SiteOptions, "retrain a route's model from the node's own spool: the route's"
                 " match selects source series, its target table the reference series (a"
                 " multi-domain route: one [routes.domains.NAME] table per domain); writes a"
                 " new version next to the deployed one and compares them on held-out series",
                 skip=frozenset({"source", "target", "name", "version", "force", "domain"})),
}
