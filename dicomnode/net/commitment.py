"""Storage Commitment Push Model (PS3.4 Annex J) on the wire: its identifiers and the
N-EVENT-REPORT's Event Information, shared by the request handler (``scp.commitment``) and
the reporter (``dispatch.commitment``)."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom.sop_class import StorageCommitmentPushModel

PUSH_MODEL = StorageCommitmentPushModel
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"  # the Push Model's well-known SOP instance
REQUEST_COMMITMENT = 1  # Action Type ID
ALL_COMMITTED, FAILURES_EXIST = 1, 2  # Event Type IDs


@dataclass(frozen=True)
class Verdict:
    """Which referenced instances are committed, and why each of the others is not."""

    committed: list[tuple[str, str]]   # (class, instance)
    failed: list[tuple[str, str, int]]  # (class, instance, Failure Reason)

    @property
    def event_type(self) -> int:
        return FAILURES_EXIST if self.failed else ALL_COMMITTED


def event_information(transaction: str, verdict: Verdict, retrieve_ae: str) -> Dataset:
    """The N-EVENT-REPORT's Event Information: where to retrieve the
    committed instances, and why each of the others failed."""
    ds = Dataset()
    ds.TransactionUID = transaction
    ds.RetrieveAETitle = retrieve_ae
    if verdict.committed:
        ds.ReferencedSOPSequence = [reference_item(cls, uid) for cls, uid in verdict.committed]
    if verdict.failed:
        ds.FailedSOPSequence = [reference_item(cls, uid, reason)
                                for cls, uid, reason in verdict.failed]
    return ds


def reference_item(cls: str, uid: str, failure: int | None = None) -> Dataset:
    """A Referenced SOP (or, with its Failure Reason, a Failed SOP) Sequence item."""
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = cls, uid
    if failure is not None:
        item.FailureReason = failure
    return item
