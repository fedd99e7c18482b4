"""What every route of the web app is given: the node's config and index, whether its
DICOM listener is up, the audit log and the form tokens; nothing they own."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.requests import Request

from dicomnode.config import Config
from dicomnode.store.index import Index
from dicomnode.web.audit import AUDIT_FILE, AuditLog
from dicomnode.web.auth import FormTokens


@dataclass
class WebContext:
    config: Config
    index: Index
    listening: Callable[[], bool]  # the DICOM listener accepts associations
    audit: AuditLog = field(init=False)
    tokens: FormTokens = field(default_factory=FormTokens)

    def __post_init__(self) -> None:
        self.audit = AuditLog(self.config.node.data_dir / AUDIT_FILE)

    def disk(self) -> dict[str, int]:
        """Free and total bytes where the node stores, and the reserve it keeps."""
        usage = shutil.disk_usage(self.config.node.data_dir)
        return {"free": usage.free, "total": usage.total,
                "reserve": self.config.node.disk_reserve_mb * 2**20}


def context_of(request: Request) -> WebContext:
    return request.app.state.ctx
