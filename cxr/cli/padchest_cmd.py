"""`cxr padchest-index`: the paper's PadChest selection and a patient-disjoint stratified split, from the
official index alone (no images needed).

Writes into ``--out``: ``selection.csv`` (+ ``selection.labels.txt``, the plain CSV format of
``training.data.csv_format``, readable by ``cxr train``), ``split.json`` (``training.splits.Split``) and
``summary.json`` (the numbers also printed). Exit 0 on success, 2 on a bad input (missing file, not a PadChest
index, bad arguments), with the reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr import NOT_FOR_CLINICAL_USE

if TYPE_CHECKING:
    from training.data.padchest import PadChestSelection
    from training.splits import Split

log = logging.getLogger(__name__)
DEFAULT_TOP_K = 35
EXIT_BAD_INPUT = 2


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `padchest-index` subcommand."""
    p = sub.add_parser("padchest-index", help="select PadChest images / labels as the paper did and split them")
    p.add_argument("--csv", type=Path, required=True, help="PadChest index (csv or csv.gz)")
    p.add_argument("--out", type=Path, required=True, help="output folder (created if needed)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of tables")
    p.add_argument("--projection", default="PA", help="value of the Projection column to keep (default PA)")
    vocab = p.add_mutually_exclusive_group()
    vocab.add_argument("--top-k", type=int, help=f"keep the K most frequent labels (default {DEFAULT_TOP_K})")
    vocab.add_argument("--min-count", type=int, help="keep every label with at least N images")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--fractions", type=float, nargs=3, default=(0.7, 0.1, 0.2), metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument(
        "--image-root",
        type=Path,
        help="folder holding PadChest's ImageDir folders; without it selection.csv lists bare file names, which "
        "readers resolve against --out",
    )
    p.set_defaults(func=cmd_padchest_index)


def cmd_padchest_index(args: argparse.Namespace) -> int:
    """Run selection + split, write the outputs, report. Returns 0, or 2 on a bad input."""
    started = time.perf_counter()
    try:
        summary = _run(args)
        summary["seconds"] = round(time.perf_counter() - started, 3)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    except (OSError, ValueError) as e:
        sys.stderr.write(f"cxr padchest-index: error: {e}\n")
        return EXIT_BAD_INPUT
    if args.json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        _print_tables(summary)
    return 0


def _run(args: argparse.Namespace) -> dict[str, Any]:
    """Read, select, split and write selection.csv + split.json; returns the summary (without seconds)."""
    from training.data.csv_format import write_csv_dataset
    from training.data.padchest import read_padchest_index, select_padchest
    from training.splits import make_split

    image_root = _image_root(args.image_root)
    top_k = None if args.min_count is not None else (args.top_k if args.top_k is not None else DEFAULT_TOP_K)
    df, index_malformed = read_padchest_index(args.csv)
    selection = select_padchest(
        df, projection=args.projection, top_k=top_k, min_count=args.min_count, image_root=image_root
    )
    split = make_split(selection.dataset, fractions=args.fractions, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv_dataset(selection.dataset, args.out / "selection.csv")
    split.save(args.out / "split.json")
    summary = _summary(selection, split)
    summary.update(index_rows=len(df), index_malformed_rows=index_malformed, projection=args.projection)
    return summary


def _image_root(root: Path | None) -> Path | None:
    if root is None:
        return None
    if not root.is_dir():
        raise FileNotFoundError(f"image root not found: {root}")
    return root.resolve()


def _summary(selection: PadChestSelection, split: Split) -> dict[str, Any]:
    """The numbers of a run, JSON-ready: counts, labels, split sizes and per-part positives."""
    ds = selection.dataset
    parts = {name: split.indices(ds, name) for name in ("train", "val", "test")}
    return {
        "intended_use": NOT_FOR_CLINICAL_USE,
        "pa_images": selection.pa_images,
        "malformed_rows": selection.malformed_rows,
        "labels": list(selection.labels),
        "label_counts": selection.label_counts,
        "images": selection.images,
        "patients": len(set(ds.patient_ids)),
        "seed": split.seed,
        "fractions": list(split.fractions),
        "splits": {name: len(idx) for name, idx in parts.items()},
        "split_positives": {
            name: dict(zip(ds.label_names, ds.labels[idx].sum(axis=0).astype(int).tolist(), strict=True))
            for name, idx in parts.items()
        },
        "patients_in_two_splits": split.patients_in_two_splits(ds),
    }


def _print_tables(summary: dict[str, Any]) -> None:
    """Human summary on stdout (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]PadChest selection[/bold]  [dim]{NOT_FOR_CLINICAL_USE}[/dim]")
    console.print(
        f"{summary['index_rows']:,} index rows ({summary['index_malformed_rows']} with unparsable labels); "
        f"{summary['projection']}: {summary['pa_images']:,} images ({summary['malformed_rows']} skipped as "
        f"malformed); {len(summary['labels'])} labels; {summary['images']:,} images with >= 1 label; "
        f"{summary['patients']:,} patients"
    )
    sizes = summary["splits"]
    console.print(
        f"split (seed {summary['seed']}): train {sizes['train']:,} / val {sizes['val']:,} / test {sizes['test']:,}"
        f"; patients in two parts: {summary['patients_in_two_splits']}; {summary['seconds']:.1f} s"
    )
    table = Table("#", "label", "images", "train", "val", "test")
    positives = summary["split_positives"]
    for rank, label in enumerate(summary["labels"], start=1):
        row = [str(positives[part][label]) for part in ("train", "val", "test")]
        table.add_row(str(rank), label, f"{summary['label_counts'][label]:,}", *row)
    console.print(table)
