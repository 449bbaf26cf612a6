"""Helpers to run a whole local stack on free ports, for tests and benchmarks (never for a deployment)."""

from __future__ import annotations

from cxr.stack.processes import free_ports
from cxr.stack.settings import port_variables


def free_port_env() -> dict[str, str]:
    """Every CXR_*_PORT variable of the stack set to a distinct port that is free right now."""
    names = port_variables()
    return dict(zip(names, (str(p) for p in free_ports(len(names))), strict=True))
