"""TorchServe inference service: ``handler.py`` (a thin adapter over cxr.serving.runner, packed into the model
archive) and ``model-config.yaml`` (batching, workers, timeouts). Importing this package imports nothing."""
