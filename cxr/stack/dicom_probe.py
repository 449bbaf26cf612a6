"""Readiness probe of the DICOM front door: a DICOM association answered by the Storage SCP (C-ECHO).

Kept apart from ``cxr.stack.health`` because it needs pynetdicom, which only this probe and the DICOM service use.
"""

from __future__ import annotations

PROBE_AE_TITLE = "CXR-PROBE"
VERIFICATION = "1.2.840.10008.1.1"


def dicom_echo(address: str, called_ae: str, *, calling_ae: str = PROBE_AE_TITLE, timeout_s: float = 3.0) -> bool:
    """True if the SCP at ``address`` (host:port) answers at the DICOM level: a C-ECHO succeeds, or the association
    is rejected by the SCP itself (the probe's calling AE title is not on its allow-list, or it is at its
    association limit: it listens and negotiates, so it is up). False when nothing answers in ``timeout_s``."""
    from pynetdicom import AE  # lazily: only this probe needs pynetdicom

    host, _, port = address.rpartition(":")
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(VERIFICATION)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    try:
        assoc = ae.associate(host.strip("[]"), int(port), ae_title=called_ae)
    except (OSError, ValueError):
        return False
    if assoc.is_rejected:
        return True
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.get("Status", -1)) == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()
