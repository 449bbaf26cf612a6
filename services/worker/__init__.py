"""The explanation worker: a Celery app (``cxr``) over Redis that computes Grad-CAM heatmaps for every label and
model, their fusion and the models' agreement, and stores them compactly in Redis (docs/ARCHITECTURE.md).

Research software: NOT FOR CLINICAL USE. Nothing is imported here: ``python -m services.worker`` must set its
environment before prometheus_client, torch or captum are imported.
"""
