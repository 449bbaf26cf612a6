"""`cxr explain-eval [--model DIR] --boxes CSV --images DIR [--json]`: localisation (pointing game, IoU, energy in
box) and faithfulness (deletion / insertion) of every model's heatmap and of each fusion rule, next to chance
baselines, on images with radiologists' boxes (``cxr.explain.evaluation``). By default the bundled ensemble.

With --json, stdout is one JSON object: {"model", "method", "grid", "iou_threshold", "faithfulness", "images",
"skipped", "rules": {name: {"kind", "pointing_hit_rate", "chance_hit_rate", "p_value_vs_chance", "mean_iou",
"mean_energy_in_box", "chance_energy_in_box", "deletion_auc", "insertion_auc", "n"}}, "per_image": [...]}.
Exit status 0, or 2 for unusable input (a bad CSV, no box that can be scored, a bad model directory).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cxr import NOT_FOR_CLINICAL_USE
from cxr.explain.methods import ATTRIBUTION_METHODS, GRADCAM


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `explain-eval` subcommand."""
    p = sub.add_parser("explain-eval", help="localisation and faithfulness of the heatmaps against radiologist boxes")
    p.add_argument("--model", type=Path, help="ensemble directory (default: the bundled model)")
    p.add_argument("--boxes", type=Path, required=True, help="CSV: Image Index, Finding Label, x, y, w, h (pixels)")
    p.add_argument("--images", type=Path, required=True, help="folder holding the boxed images")
    p.add_argument("--method", default=GRADCAM, choices=ATTRIBUTION_METHODS, help="attribution method")
    p.add_argument("--grid", type=int, default=64, help="heatmap grid (the worker's CXR_HEATMAP_GRID)")
    p.add_argument("--steps", type=int, default=8, help="deletion / insertion steps")
    p.add_argument("--no-faithfulness", action="store_true", help="localisation only (much faster)")
    p.add_argument("--out", type=Path, help="also write the JSON report to this file")
    p.add_argument("--json", action="store_true", help="print the JSON report, nothing else")
    p.set_defaults(func=cmd_explain_eval)


def cmd_explain_eval(args: argparse.Namespace) -> int:
    """Run the evaluation; print a table (or the JSON report). Returns 0, or 2 for unusable input."""
    from cxr.cli.train_cmds import _default_model
    from cxr.core.errors import CxrError
    from cxr.explain.evaluation import EvalOptions, evaluate, read_boxes
    from cxr.models.bundle import load_ensemble

    model_dir = args.model or _default_model()
    progress = None if args.json else _say_progress
    opts = EvalOptions(grid=args.grid, method=args.method, faithfulness=not args.no_faithfulness,
                       steps=args.steps, progress=progress)  # fmt: skip
    try:
        manifest, ensemble = load_ensemble(model_dir)
        report = evaluate(ensemble, manifest, read_boxes(args.boxes), args.images, opts)
    except CxrError as e:
        sys.stderr.write(f"cxr explain-eval: {e}\n")
        return 2
    report["model"]["dir"] = str(model_dir)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    if args.json:
        sys.stdout.write(json.dumps(report, allow_nan=False) + "\n")
    else:
        _print_table(report)
    return 0


def _say_progress(text: str) -> None:
    sys.stderr.write(f"  {text}\n")


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    m = report["model"]
    title = f"{m['name']} {m['version']} ({report['method']}): {report['images']} boxed images"
    caption = f"IoU at {report['iou_threshold']} of max; grid {report['grid']}. {NOT_FOR_CLINICAL_USE}"
    table = Table(title=title, caption=caption)
    for column in ("map", "kind", "pointing", "chance", "p", "IoU", "energy", "chance energy", "deletion", "insertion"):
        table.add_column(column, justify="left" if column in ("map", "kind") else "right")
    for name, r in report["rules"].items():
        table.add_row(name, r["kind"], *(_fmt(r.get(k)) for k in (
            "pointing_hit_rate", "chance_hit_rate", "p_value_vs_chance", "mean_iou", "mean_energy_in_box",
            "chance_energy_in_box", "deletion_auc", "insertion_auc")))  # fmt: skip
    console = Console(width=150)
    console.print(table)
    for s in report["skipped"]:
        console.print(f"skipped {s['image']} ({s['label']}): {s['why']}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
