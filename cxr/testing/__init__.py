"""Helpers for tests and benchmarks (never imported by a service): real DICOM peers run as plain processes
(``dicom_peers``: Orthanc, dcmtk's storescp) and the bad-input corpus (``bad_dicom``)."""
