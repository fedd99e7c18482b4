"""What every SCP handler is given: the node's config and index, nothing it owns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dicomnode.config import Config
from dicomnode.store.index import Index


@dataclass
class ScpContext:
    """Everything the handlers need, and nothing they own."""

    config: Config
    index: Index

    @property
    def data_dir(self) -> Path:
        return self.config.node.data_dir
