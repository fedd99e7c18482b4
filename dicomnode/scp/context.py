"""What every SCP handler is given: the node's config, index and incoming files, and the
association slots; nothing they own."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomnode.config import Config
from dicomnode.store.incoming import IncomingFiles
from dicomnode.store.index import Index


class Slots:
    """``max_associations``, counted from complete association requests: a connection
    still sending its A-ASSOCIATE-RQ takes none (the transport guard bounds those)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: set[Any] = set()
        self._lock = threading.Lock()

    def take(self, assoc: Any) -> bool:
        """Hold a slot for ``assoc``; False when all are held (by live associations)."""
        with self._lock:
            self._held = {a for a in self._held if a.is_alive()}
            if len(self._held) >= self.limit:
                return False
            self._held.add(assoc)
            return True

    def give_back(self, assoc: Any) -> None:
        with self._lock:
            self._held.discard(assoc)

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)


@dataclass
class ScpContext:
    """Everything the handlers need, and nothing they own."""

    config: Config
    index: Index
    incoming: IncomingFiles = field(init=False)
    slots: Slots = field(init=False)
    receipts: Index = field(init=False)  # received instances: durable by their files

    def __post_init__(self) -> None:
        node = self.config.node
        self.receipts = Index(self.config.index_path, durable=False)
        self.incoming = IncomingFiles(self.config.incoming_dir,
                                      node.disk_reserve_mb * 2**20)
        self.slots = Slots(node.max_associations)

    @property
    def data_dir(self) -> Path:
        return self.config.node.data_dir
