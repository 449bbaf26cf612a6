"""Pieces shared by the services' settings modules (``services.ingestion.settings``, ``services.worker.settings``):
the description of one setting (field, environment variable, parser, help), the command line with one flag per
setting, and parsers of values given as text. Each service keeps its own dataclass, its own order of precedence
details and its own ``SettingsError``. Standard library only: the services read their settings before anything
heavy is imported."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

REDIS_URL_SCHEMES = ("redis://", "rediss://", "unix://")


@dataclass(frozen=True)
class Setting:
    """One setting: the settings dataclass field ``name``, its environment variable ``env``, ``parse`` (text ->
    value, raises ValueError), a ``help`` line and whether it has a command-line flag (``cli``)."""

    name: str
    env: str
    parse: Callable[[str], Any]
    help: str
    cli: bool = True

    @property
    def flag(self) -> str:
        """The command-line flag: ``--`` and the field name with dashes, e.g. ``--max-concurrent``."""
        return "--" + self.name.replace("_", "-")


def build_parser(prog: str, description: str, settings: Iterable[Setting]) -> argparse.ArgumentParser:
    """A parser with one optional flag per setting that has one (default None = not given on the command line);
    each help text ends with the environment variable the flag overrides."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for setting in settings:
        if setting.cli:
            parser.add_argument(setting.flag, dest=setting.name, default=None, help=f"{setting.help} [{setting.env}]")
    return parser


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """A parser: ``kind(text)`` (e.g. int, float) that must be > 0; raises ValueError otherwise."""

    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise ValueError(f"must be > 0, got {text}")
        return value

    return parse


def non_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """A parser: ``kind(text)`` (e.g. int, float) that must be >= 0; raises ValueError otherwise."""

    def parse(text: str) -> Any:
        value = kind(text)
        if value < 0:
            raise ValueError(f"must be >= 0, got {text}")
        return value

    return parse


def is_redis_url(value: str) -> bool:
    """True if ``value`` has a scheme redis-py connects with (redis://, rediss://, unix://)."""
    return value.startswith(REDIS_URL_SCHEMES)


def port_number(value: str) -> int:
    """A parser: a TCP port, 0..65535 (0 = off / any). Raises ValueError otherwise."""
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} outside 0..65535")
    return port


def positive_float(value: str) -> float:
    """A parser: a positive finite number. Raises ValueError otherwise."""
    x = float(value)
    if not x > 0 or x == float("inf"):
        raise ValueError(f"must be a positive finite number, got {value}")
    return x


def redis_url(value: str) -> str:
    """A parser: a Redis URL (``is_redis_url``). The error never echoes the credentials part."""
    if not is_redis_url(value):
        raise ValueError(f"expected a redis:// URL, got {value.split('@')[-1]!r}")  # never echo a password
    return value


def host_name(value: str) -> str:
    """A parser: a host name or address (IPv6 brackets removed). Raises ValueError for an empty or odd value."""
    host = value.strip().strip("[]")
    if not host or any(c.isspace() or c in "/@" for c in host):
        raise ValueError(f"expected a host name or address, got {value!r}")
    return host
