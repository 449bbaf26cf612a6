"""`cxr` entry point: one argparse parser; each command group lives in its own module exposing
``register(subparsers)``, and is imported only when the CLI starts (no torch import for `cxr status`)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cxr import NOT_FOR_CLINICAL_USE, __version__

# modules under cxr.cli that contribute subcommands
COMMAND_MODULES = ("stack_cmds", "analyze_cmd", "padchest_cmd", "train_cmds", "purge_cmd", "explain_eval_cmd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr",
        description=f"Explainable multilabel chest X-ray analysis. {NOT_FOR_CLINICAL_USE}",
    )
    parser.add_argument("--version", action="version", version=f"cxr {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"cxr.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"cxr.cli.{name}":
                raise
            continue  # command group not built yet
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
