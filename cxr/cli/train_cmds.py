"""`cxr train`, `cxr ensemble`, `cxr evaluate`, `cxr export`: the training pipeline of the paper.

Heavy modules (torch, the training package) are imported only when one of these commands runs. Expected
failures (bad paths, bad ensembles, label mismatches) print one clear line on stderr and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cxr import NOT_FOR_CLINICAL_USE
from training.options import add_train_arguments

DEFAULT_MODEL = Path("model_store") / "cxr-nih14-imagenet"


def _say(text: str, err: bool = False) -> None:
    """One line for a person (stdout), or for errors (stderr)."""
    (sys.stderr if err else sys.stdout).write(text + "\n")


def _guarded(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn expected errors into a message on stderr and exit code 2."""

    def wrapper(args: argparse.Namespace) -> int:
        from cxr.core.errors import CxrError

        try:
            return run(args)
        except (CxrError, OSError, ValueError) as e:
            _say(f"cxr {args.command}: error: {e}", err=True)
            return 2

    return wrapper


def _train(args: argparse.Namespace) -> int:
    from training.train import run_training

    record = run_training(args)
    kept = f"best epoch {record['best_epoch']}" if record["checkpoint"] == "best" else "final epoch kept"
    _say(f"trained {record['arch']} ({record['recipe_name']} recipe, init {record['init']['init']}) for "
         f"{record['epochs_run']} epochs; {kept} (validation loss {record['best_val_loss']:.4f}); "
         f"run in {args.out}")  # fmt: skip
    return 0


def _ensemble(args: argparse.Namespace) -> int:
    from training.distributed import pick_device
    from training.ensemble_build import build_ensemble

    m = build_ensemble(args.runs, args.data, args.split, args.out, args.name, args.version, pick_device(args.device),
                       per_model_thresholds=not args.no_model_thresholds, description=args.description,
                       workers=args.workers)  # fmt: skip
    _say(f"ensemble {m.name} {m.version} ({', '.join(m.model_names)}) written to {args.out}. {NOT_FOR_CLINICAL_USE}")
    return 0


def _default_model() -> Path:
    """model_store/cxr-nih14-imagenet under the current directory, else under the repository."""
    if DEFAULT_MODEL.is_dir():
        return DEFAULT_MODEL
    return Path(__file__).resolve().parents[2] / DEFAULT_MODEL


def _evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate_ensemble

    if args.part != "test" and args.split is None:
        raise ValueError("--part needs --split")
    model = args.model or _default_model()
    report = evaluate_ensemble(model, args.data, args.split, args.part, args.out, args.bootstrap, args.seed,
                               args.device, workers=args.workers)  # fmt: skip
    if args.json:
        _say(json.dumps(report, allow_nan=False))
        return 0
    _print_summary(report)
    return 0


def _print_summary(report: dict[str, Any]) -> None:
    from training.report import overall_table

    _say(f"{report['model']['name']} {report['model']['version']} on {report['n_images']} images "
          f"({report['data']['part']}). {NOT_FOR_CLINICAL_USE}")  # fmt: skip
    _say("\n".join(overall_table(report)))
    if report["skipped_labels"]:
        _say(f"skipped labels (not in the data): {', '.join(report['skipped_labels'])}")


def _export(args: argparse.Namespace) -> int:
    from training.export import export_ensemble

    result = export_ensemble(args.ensemble, args.out, args.mar, args.force)
    _say(" ".join(f"{k}={v}" for k, v in result.items()))
    return 0


def _add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train one CNN of the ensemble (one process)",
        description="Train one CNN of the ensemble in one process (--recipe paper|small-data, --init "
        "none|imagenet|torchxrayvision|PATH). Several GPUs / machines: torchrun --nproc_per_node=N -m "
        "training.train ARGS (same ARGS; --batch-size is per process).",
    )
    add_train_arguments(p)
    p.set_defaults(func=_guarded(_train))


def _add_ensemble(sub: Any) -> None:
    p = sub.add_parser("ensemble", help="combine training runs into an ensemble with tuned thresholds")
    p.add_argument("--runs", nargs="+", required=True, type=Path, help="RUN_DIR of each model")
    p.add_argument("--data", required=True, help="the labelled data the runs were trained on")
    p.add_argument("--split", required=True, type=Path, help="split JSON; thresholds are tuned on its val part")
    p.add_argument("--out", required=True, type=Path, help="ensemble directory to write")
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--description", default="")
    p.add_argument("--no-model-thresholds", action="store_true", help="votes use the ensemble thresholds")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=_guarded(_ensemble))


def _add_evaluate(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="evaluate an ensemble (every model and every rule) with bootstrap CIs")
    p.add_argument("--model", type=Path, help=f"ensemble directory (default {DEFAULT_MODEL})")
    p.add_argument("--data", required=True, help="NIH folder or labelled CSV")
    p.add_argument("--split", type=Path, help="split JSON (default: all images of --data)")
    p.add_argument("--part", default="test", choices=("train", "val", "test"))
    p.add_argument("--out", type=Path, help="write report.md, report.json and figures here")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for the 95%% CIs (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.set_defaults(func=_guarded(_evaluate))


def _add_export(sub: Any) -> None:
    p = sub.add_parser("export", help="validate an ensemble and copy it to model_store/NAME (optionally a .mar)")
    p.add_argument("--ensemble", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="e.g. model_store/NAME")
    p.add_argument("--mar", type=Path, help="also build the TorchServe archive into this folder")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_guarded(_export))


def register(subparsers: Any) -> None:
    """Add train / ensemble / evaluate / export to the `cxr` parser."""
    _add_train(subparsers)
    _add_ensemble(subparsers)
    _add_evaluate(subparsers)
    _add_export(subparsers)


def standalone(argv: list[str] | None = None) -> int:
    """``python -m cxr.cli.train_cmds COMMAND ...``: these four commands without the rest of the `cxr` CLI (for
    machines that only have the training dependencies). -> exit code."""
    import logging

    parser = argparse.ArgumentParser(prog="python -m cxr.cli.train_cmds", description=NOT_FOR_CLINICAL_USE)
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(standalone())
