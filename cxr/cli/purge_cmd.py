"""`cxr purge --study UID [--redis-url URL] [--json]`: delete everything stored for one study, on request
(cxr.stack.purge: its jobs, their blobs and cached results, its index).

Redis: ``--redis-url``, else ``CXR_REDIS_URL``, else the local stack's. The study is echoed only hashed (as it
appears in keys). Exit 0 when the purge ran (also when nothing was stored for the study), 1 when Redis cannot be
reached (run it again), 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `purge` subcommand."""
    p = sub.add_parser("purge", help="delete everything stored for a study (results, jobs, uploaded files)")
    p.add_argument("--study", required=True, metavar="UID", help="Study Instance UID")
    p.add_argument("--redis-url", help="Redis URL (default: CXR_REDIS_URL, else the local stack's)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_purge)


def cmd_purge(args: argparse.Namespace) -> int:
    """Purge the study; print what was deleted."""
    import redis

    from cxr.stack.errors import StackError
    from cxr.stack.purge import purge_study

    try:
        url = args.redis_url or redis_url()
    except StackError as e:
        sys.stderr.write(f"cxr purge: {e}\n")
        return 2
    if not args.study.strip():
        sys.stderr.write("cxr purge: --study needs a Study Instance UID\n")
        return 2
    client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
    try:
        report = purge_study(client, args.study)
    except redis.RedisError as e:
        sys.stderr.write(f"cxr purge: Redis did not answer ({type(e).__name__}); nothing is known to be deleted\n")
        return 1
    finally:
        client.close()
    if args.json:
        sys.stdout.write(json.dumps(dataclasses.asdict(report)) + "\n")
    else:
        disk = "; Redis rewrites its append-only file" if report.disk_rewrite else ""
        counts = f"{report.jobs} job(s), {report.keys_deleted} key(s) deleted"
        sys.stdout.write(f"study {report.study[:12]}: {counts}{disk}\n")
    return 0


def redis_url() -> str:
    """CXR_REDIS_URL, else the local stack's Redis (cxr.stack.settings)."""
    from cxr.stack.settings import StackSettings

    return os.environ.get("CXR_REDIS_URL") or StackSettings.from_env().redis_url
