"""`cxr up`, `cxr down`, `cxr status [--json]`: the local stack (redis-server, TorchServe, ingestion, worker),
started as detached processes with logs and state under CXR_HOME (default ./.cxr). See cxr.stack.settings for
the environment variables (ports, paths, timeouts)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cxr import NOT_FOR_CLINICAL_USE

WIDTH_WHEN_PIPED = 140  # rich assumes 80 columns without a terminal, which truncates the tables


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `up`, `down` and `status` subcommands."""
    p = sub.add_parser("up", help="start the local stack and wait until every service is ready")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("down", help="stop the local stack (SIGTERM, grace period, SIGKILL)")
    p.set_defaults(func=cmd_down)
    p = sub.add_parser("status", help="state of each service of the local stack")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_status)


def cmd_up(args: argparse.Namespace) -> int:
    """Start the stack; print what the served model is. Exit 1 (with the failing service's log tail) on error."""
    from rich.console import Console

    from cxr.stack import ServiceStartError, StackError, StackSettings, stack_status, up

    console, errors = make_console(), Console(stderr=True)
    try:
        settings = StackSettings.from_env()
        state = up(settings, say=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    except ServiceStartError as e:
        errors.print(f"[bold red]cxr up failed[/bold red]: {e}")
        if e.log_tail:
            errors.print(f"--- last lines of the {e.service} log ---", markup=False)
            errors.print(e.log_tail, markup=False, highlight=False)
        return 1
    except StackError as e:
        errors.print(f"[bold red]cxr up failed[/bold red]: {e}")
        return 1
    _print_model(console, state.model)
    _print_services(console, stack_status(settings)["services"])
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    """Stop the stack; succeed (exit 0) when nothing was running."""
    from rich.console import Console

    from cxr.stack import StackError, StackSettings, down

    console = Console()
    try:
        stopped = down(StackSettings.from_env(), say=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    except StackError as e:
        Console(stderr=True).print(f"[bold red]cxr down failed[/bold red]: {e}")
        return 1
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print each service's state; exit 0 whether the stack is up or stopped (1 only for bad settings)."""
    from rich.console import Console

    from cxr.stack import StackError, StackSettings, stack_status

    try:
        status = stack_status(StackSettings.from_env())
    except StackError as e:
        Console(stderr=True).print(f"[bold red]cxr status failed[/bold red]: {e}")
        return 1
    if args.json:
        sys.stdout.write(json.dumps(status) + "\n")
        return 0
    console = make_console()
    _print_model(console, status["model"])
    _print_services(console, status["services"])
    return 0


def make_console() -> Any:
    """A rich Console on stdout, wide enough for the tables when stdout is not a terminal."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=WIDTH_WHEN_PIPED)


def _print_model(console: Any, model: dict[str, Any]) -> None:
    from rich.panel import Panel

    if "error" in model:
        console.print(Panel(f"no servable model at {model['dir']}: {model['error']}", title="model"))
        return
    members = ", ".join(f"{m['name']} ({m['arch']})" for m in model.get("members", []))
    text = (
        f"[bold]{model['name']}[/bold] version {model['version']} - {len(model['labels'])} labels, "
        f"{model['input_size']} px, rule {model['ensemble_rule']}\n"
        f"members: {members}\n"
        f"{model.get('description') or '(no description in the manifest)'}\n"
        f"trained on: {model.get('trained_on') or 'not stated'}\n"
        f"{_held_out_line(model.get('held_out'))}"
        f"intended use: {model.get('intended_use', '')}\n"
        f"[bold red]{NOT_FOR_CLINICAL_USE}[/bold red]"
    )
    console.print(Panel(text, title="served model", expand=False))


def _held_out_line(h: dict[str, Any] | None) -> str:
    """One line of held-out evidence for the banner ('' when the bundle has no evaluation report)."""
    if not h:
        return ""
    lo, hi = h["ctp_ci95"]
    line = (f"held-out ({h['n_images']} {h['part']} images): ensemble mean AUROC {h['ctp_auroc_mean']:.3f} "
            f"[{lo:.3f}, {hi:.3f}], best single model ({h['best_model']}) "
            f"{h['best_model_auroc_mean']:.3f}")  # fmt: skip
    if h.get("baseline_auroc_mean") is not None:
        line += f", frozen-feature baseline {h['baseline_auroc_mean']:.3f}"
    return line + "\n"


def _print_services(console: Any, services: dict[str, dict[str, Any]]) -> None:
    from rich.table import Table

    colours = {"ready": "green", "running": "yellow", "unhealthy": "red", "stopped": "dim"}
    table = Table(title="cxr stack")
    for column in ("service", "state", "pid", "address", "metrics"):
        table.add_column(column)
    for name, s in services.items():
        state = f"[{colours.get(s['state'], 'white')}]{s['state']}[/]"
        down = [dep for dep, seen in s.get("dependencies", {}).items() if seen != "up"]
        if down:  # what the service itself sees: e.g. "unhealthy (redis down)"
            state += " (" + ", ".join(f"{dep} {s['dependencies'][dep]}" for dep in down) + ")"
        table.add_row(name, state, str(s["pid"] or "-"), s["address"], s["metrics_url"] or "-")
    console.print(table)
    for name, s in services.items():
        console.print(f"[dim]{name} log: {s['log']}[/dim]", highlight=False)
