"""The DICOM front door: a Storage SCP that runs every pushed CR/DX instance through the ingestion API's Analyze
pipeline, and a C-STORE sender that delivers the results (SR + Secondary Captures) to a configured destination
from a durable Redis outbox. Never imports torch."""
