"""Transfer syntaxes: which the node prefers when receiving, which contexts it proposes when
sending stored instances, and fitting an instance to what a peer accepted.

Shared by the outbox (C-STORE to peers) and Q/R (C-MOVE and C-GET sub-operations).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom.presentation import PresentationContext, build_context

# Where a peer proposes several transfer syntaxes for one context, the node takes the one
# that comes first in this list (explicit VR first: implicit VR loses the VR of private
# elements), else the peer's first: each is stored as it arrives; these are the decoded ones.
PREFERRED_SYNTAXES = (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
    JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless,
)
_RANK = {str(uid): rank for rank, uid in enumerate(PREFERRED_SYNTAXES)}
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS = 128  # presentation contexts one association may propose


def prefer_syntaxes(proposed: list[PresentationContext]) -> None:
    """Order each proposed context's transfer syntaxes by :data:`PREFERRED_SYNTAXES`
    (stable: others keep the peer's order, after them), as the unrestricted storage
    negotiation accepts the first."""
    for context in proposed:
        context.transfer_syntax = sorted(context.transfer_syntax,
                                         key=lambda uid: _RANK.get(str(uid), len(_RANK)))


def store_contexts(items: Iterable[tuple[str, str]]) -> list[Any]:
    """Presentation contexts for (SOP class, stored transfer syntax) pairs.

    Each SOP class gets one uncompressed context; a class stored compressed also gets a
    context offering exactly its stored syntax, so a peer that accepts it receives the
    bytes as stored and one that does not gets them decompressed.
    """
    classes: dict[str, set[str]] = defaultdict(set)
    for sop_class, ts in items:
        classes[sop_class].add(ts)
    contexts = []
    for sop_class, syntaxes in classes.items():
        for ts in sorted(syntaxes):
            if UID(ts).is_compressed:
                contexts.append(build_context(sop_class, [ts]))
        contexts.append(build_context(sop_class, list(UNCOMPRESSED)))
    return contexts[:MAX_CONTEXTS]


class NotSendable(ValueError):
    """The peer cannot take this instance over the negotiated contexts (message: UIDs)."""


def fit_to_association(ds: Dataset, accepted: Sequence[Any], role: str = "scu") -> Dataset:
    """Make ``ds`` sendable over one of the ``accepted`` contexts, decompressing if needed.

    Raises :class:`NotSendable` when the peer accepted no context that can carry it.
    """
    sop_class = str(ds.SOPClassUID)
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    usable = [cx for cx in accepted if cx.abstract_syntax == sop_class
              and (cx.as_scu if role == "scu" else cx.as_scp)]
    if not usable:
        raise NotSendable(f"peer accepted no presentation context for SOP class {sop_class}")
    syntaxes = {UID(cx.transfer_syntax[0]) for cx in usable}
    if ts in syntaxes or (not ts.is_compressed and any(not s.is_compressed for s in syntaxes)):
        return ds
    if any(not s.is_compressed for s in syntaxes) and ts.is_compressed:
        # -> Explicit VR Little Endian; same instance (pydicom would mint a new UID)
        ds.decompress(generate_instance_uid=False)
        return ds
    raise NotSendable(f"peer accepted SOP class {sop_class} only in"
                      f" {sorted(map(str, syntaxes))}, instance is {ts}")


def describe_failure(exc: Exception) -> str:
    """What a failed send or retrieve of one instance records and logs.

    Our own reasons in full, a file system error with its cause and file, anything else
    (an unreadable file, a codec failure) by its type only: library messages can quote
    element bytes, and with them a patient's name.
    """
    if isinstance(exc, NotSendable):
        return str(exc)
    if isinstance(exc, OSError):
        return " ".join(str(p) for p in (f"{type(exc).__name__}:", exc.strerror or exc.errno,
                                         exc.filename) if p)
    return type(exc).__name__
