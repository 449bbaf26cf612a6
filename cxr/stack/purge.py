"""Purge a study's data from Redis on request (``cxr purge --study UID``): every job analysed from the study's
images (job hash and all its blobs: model input, uploaded DICOM, findings, display image, heatmaps, and any other
``cxr:job:{id}:*`` key), the cached results of its instances, and the study's index ``cxr:study:{hash}``.

The index is written by ingestion in the same transaction as the job (``services.ingestion.result_store``), so
every job that was acknowledged is found. A job that a worker is explaining while it is purged stops at its next
progress update and writes nothing more (the worker only writes to a job hash that still exists). Explanation
messages still queued for purged jobs carry only the job id; the worker drops them (JOB_NOT_FOUND).

Redis's append-only file still holds the deleted values until it is rewritten, so a purge that deleted anything
asks Redis to rewrite it (``BGREWRITEAOF``, in the background): afterwards the data is gone from disk too.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from cxr.core.jobs import JOB_BLOBS, blob_key, is_job_id, job_key, sop_digest, study_key

RESULT_PREFIX = "cxr:result:"
SCAN_COUNT = 1000


@dataclass(frozen=True)
class PurgeReport:
    """What a purge removed: the study (hashed, as in keys), its jobs, and how many Redis keys were deleted."""

    study: str
    jobs: int
    keys_deleted: int
    disk_rewrite: bool = False  # an append-only file rewrite was started so the values leave the disk too


def purge_study(client: redis.Redis, study_instance_uid: str) -> PurgeReport:
    """Delete everything stored for ``study_instance_uid``. Raises ValueError for an empty UID and redis errors
    when Redis cannot be reached (nothing is known to be deleted then; run it again)."""
    uid = study_instance_uid.strip()
    if not uid:
        raise ValueError("a Study Instance UID is required")
    index = study_key(uid)
    members = sorted(m.decode() for m in client.smembers(index))  # type: ignore[union-attr]
    job_ids = [m for m in members if is_job_id(m)]
    keys = {index, *(m for m in members if m.startswith(RESULT_PREFIX))}
    for job_id in job_ids:
        keys.add(job_key(job_id))
        keys.update(blob_key(job_id, name) for name in JOB_BLOBS)
        keys.update(k.decode() for k in client.scan_iter(match=f"{job_key(job_id)}:*", count=SCAN_COUNT))
    deleted = int(client.delete(*sorted(keys)))  # type: ignore[arg-type]
    rewrite = bool(deleted) and _rewrite_append_only_file(client)
    return PurgeReport(study=sop_digest(uid), jobs=len(job_ids), keys_deleted=deleted, disk_rewrite=rewrite)


def _rewrite_append_only_file(client: redis.Redis) -> bool:
    """Start (or schedule, when one runs) a rewrite of the AOF; False when persistence is off (nothing on disk)."""
    if str(client.config_get("appendonly").get("appendonly")) != "yes":
        return False
    try:
        client.bgrewriteaof()
    except redis.ResponseError as e:  # "Background append only file rewriting already in progress": it will do
        if "already in progress" not in str(e):
            raise
    return True
