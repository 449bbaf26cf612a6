"""``CXR_HOME/stack.json``: what ``cxr up`` started (pids, addresses, metrics URLs, log paths, the model), so
that ``cxr down`` and ``cxr status`` — separate processes — find it. Written after every service start, so a
failed or interrupted ``cxr up`` still leaves enough behind to stop what it started."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cxr.stack.processes import ProcessRef

log = logging.getLogger(__name__)
STATE_VERSION = 1


@dataclass
class ServiceRecord:
    """One started service."""

    pid: int
    create_time: float
    address: str
    metrics_url: str | None
    log: str
    ports: dict[str, int]
    ready_at: float | None = None
    pgid: int | None = None  # its process group, when it does not lead its own (TorchServe's Java)

    @property
    def ref(self) -> ProcessRef:
        return ProcessRef(self.pid, self.create_time)


@dataclass
class StackState:
    """Everything ``cxr up`` wrote down; services in start order."""

    home: str
    model_dir: str
    model: dict[str, Any]
    services: dict[str, ServiceRecord] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    version: int = STATE_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StackState:
        """Raises KeyError/TypeError/ValueError on a malformed document."""
        services = {name: ServiceRecord(**rec) for name, rec in d["services"].items()}
        return cls(
            home=d["home"], model_dir=d["model_dir"], model=dict(d["model"]), services=services,
            started_at=float(d["started_at"]), version=int(d.get("version", STATE_VERSION)),
        )  # fmt: skip


def write_state(path: Path, state: StackState) -> None:
    """Atomically replace ``path`` with ``state`` (write a temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(state.to_json())
    os.replace(tmp, path)


def read_state(path: Path) -> StackState | None:
    """The state at ``path``; None if there is none. A corrupt file is logged and treated as absent."""
    try:
        return StackState.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("ignoring unreadable stack state %s: %s", path, e)
        return None


def remove_state(path: Path) -> None:
    """Delete the state file if it exists."""
    path.unlink(missing_ok=True)
