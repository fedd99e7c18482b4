"""The training modes by name: what ``dicomnode train MODE`` and ``train site`` run on
loaded series (each writes ``folder``, the model folder)."""

from __future__ import annotations

from collections.abc import Callable

from trainers.synthetic import train_synthetic_series
from trainers.train import TrainOutcome, train_paired_series, train_unpaired_series

TRAIN_SERIES: dict[str, Callable[..., TrainOutcome]] = {
    "paired": train_paired_series,
    "unpaired": train_unpaired_series,
    "synthetic": train_synthetic_series,
}
