"""gRPC ingestion service (cxr.ingestion.v1): DICOM in, ensemble findings out, explanations queued and served.

Never imports torch: decoding and preprocessing run in numpy through ``cxr.core``; inference is TorchServe's.
"""
