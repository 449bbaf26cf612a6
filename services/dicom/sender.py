"""C-STORE SCU: sends the result objects of one source instance to the destination over one association.

``send_datasets`` never raises for a peer that is down, refuses the association, aborts or answers with a failure
status: it reports what was stored and what was not, and whether trying again later can help.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from services.dicom.settings import Destination
from services.dicom.statuses import RETRYABLE, SUCCESS

logger = logging.getLogger(__name__)

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_WARNING_STATUSES = (0x0001, 0xB000, 0xB006, 0xB007)  # stored, with a warning (PS3.4 B.2.3)


@dataclass(frozen=True)
class SendTimeouts:
    """Bounds of one delivery attempt (seconds)."""

    connect_s: float = 10.0
    acse_s: float = 30.0
    dimse_s: float = 60.0
    network_s: float = 60.0


@dataclass
class SendReport:
    """What one attempt achieved. ``stored``: SOP Instance UIDs the destination accepted; ``failures``: (UID,
    status) it refused; ``error``: why nothing could be sent (no association), or "" ."""

    stored: set[str] = field(default_factory=set)
    failures: list[tuple[str, int]] = field(default_factory=list)
    error: str = ""

    @property
    def complete(self) -> bool:
        return not self.error and not self.failures

    @property
    def retryable(self) -> bool:
        """True when a later attempt may succeed: no association, or only 'out of resources' refusals."""
        return bool(self.error) or all(status in RETRYABLE or status == -1 for _, status in self.failures)

    def describe(self) -> str:
        if self.error:
            return self.error
        return "; ".join(f"status 0x{s:04X}" if s >= 0 else "no response" for _, s in self.failures)


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(uid)) if uid else ExplicitVRLittleEndian


def _build_ae(calling_aet: str, datasets: Sequence[Dataset], timeouts: SendTimeouts) -> AE:
    """An SCU AE proposing, per SOP class, the datasets' own transfer syntax (plus the uncompressed ones)."""
    ae = AE(ae_title=calling_aet)
    ae.connection_timeout = timeouts.connect_s
    ae.acse_timeout = timeouts.acse_s
    ae.dimse_timeout = timeouts.dimse_s
    ae.network_timeout = timeouts.network_s
    syntaxes: dict[str, list[UID]] = {}
    for ds in datasets:
        wanted = syntaxes.setdefault(str(ds.SOPClassUID), [])
        ts = _transfer_syntax(ds)
        for uid in (ts, *(_UNCOMPRESSED if not ts.is_compressed else ())):
            if uid not in wanted:
                wanted.append(uid)
    for sop_class, transfer_syntaxes in syntaxes.items():
        ae.add_requested_context(sop_class, transfer_syntaxes)
    return ae


def send_datasets(
    destination: Destination, datasets: Sequence[Dataset], *, calling_aet: str, timeouts: SendTimeouts
) -> SendReport:
    """C-STORE each dataset to ``destination`` over one association; see :class:`SendReport`."""
    report = SendReport()
    if not datasets:
        return report
    ae = _build_ae(calling_aet, datasets, timeouts)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        why = "rejected the association" if assoc.is_rejected else "could not be reached or aborted"
        report.error = f"{destination} {why}"
        return report
    try:
        for number, ds in enumerate(datasets, start=1):
            uid = str(ds.SOPInstanceUID)
            status = _store_one(assoc, ds, number)
            if status == SUCCESS or status in _WARNING_STATUSES:
                report.stored.add(uid)
            else:
                report.failures.append((uid, status))
            if not assoc.is_established:
                report.error = f"{destination} dropped the association"
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return report


def _store_one(assoc: object, ds: Dataset, msg_id: int) -> int:
    """One C-STORE; the response status, or -1 for no valid response (timeout, abort, no context)."""
    try:
        rsp = assoc.send_c_store(ds, msg_id=msg_id)  # type: ignore[attr-defined]
    except ValueError as e:  # no accepted presentation context for this SOP class / transfer syntax
        logger.warning("result object not sent: %s", e)
        return -1
    return int(rsp.Status) if "Status" in rsp else -1
