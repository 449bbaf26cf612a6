"""The shared domain core: plain Python + numpy, no torch, no I/O beyond reading files it is handed.

Imported by training, by the TorchServe handler, by the ingestion service and by the explanation worker,
so that every one of them preprocesses, thresholds and votes identically.
"""
