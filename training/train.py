"""Train one CNN of the ensemble: ``python -m training.train ARGS`` (or ``cxr train ARGS``); multi-GPU and
multi-node with ``torchrun --nproc_per_node=N -m training.train ARGS`` (see training.distributed).

RUN_DIR receives: best.pt (the weights the recipe keeps: best validation loss, or the final epoch's), final.pt
(the last epoch's raw weights), ema.pt (their moving average, when the recipe averages), last.pt (resumable),
metrics.csv, run.json (everything needed to rebuild and judge the model: resolved recipe, initial weights and
their sha256, input normalisation, positive weights), split.json (when no --split was given), tb/.

Imports only torch, torchvision, numpy and the project's core (no captum / celery / redis / pydicom), so it runs
on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr.core.preprocess import PreprocessSpec
from cxr.cpu_allocator import keep_freed_memory
from cxr.models.architectures import build_model
from cxr.models.backbones import get_backbone
from training.augment import augment_preset
from training.data.base import LabelledImages
from training.distributed import DistContext, barrier, init_distributed, shutdown
from training.init_weights import load_initial_weights, resolve_init
from training.losses import label_counts, make_loss, pos_weight_from_labels
from training.options import build_parser, recipe_from_args
from training.recipes import Recipe, as_dict
from training.sampling import make_sampler
from training.torch_data import RadiographDataset, make_loader, maybe_cache
from training.trainer import (
    FitResult,
    TrainConfig,
    batchnorm_names,
    fit,
    freeze_early_convs,
    seed_everything,
    use_channels_last,
)

log = logging.getLogger(__name__)


def cap_parts(parts: dict[str, np.ndarray], max_images: int | None, seed: int) -> dict[str, np.ndarray]:
    """Keep at most ``max_images`` images over all parts, each part cut in proportion (at least 2 each),
    chosen by a seeded permutation; indices stay sorted."""
    total = sum(len(v) for v in parts.values())
    if max_images is None or max_images >= total:
        return parts
    rng = np.random.default_rng(seed)
    keep = {k: max(2, round(len(v) * max_images / total)) for k, v in parts.items()}
    return {k: np.sort(rng.permutation(v)[: keep[k]]) for k, v in parts.items()}


def resolve_split(ds: LabelledImages, args: argparse.Namespace, ctx: DistContext) -> tuple[Any, Path]:
    """Load --split, or RUN_DIR/split.json when resuming, or make one (rank 0 saves it) -> (Split, its path)."""
    from training.splits import Split, make_split

    own = Path(args.out) / "split.json"
    if args.split is not None:
        return Split.load(args.split), Path(args.split)
    if args.resume and own.is_file():
        return Split.load(own), own
    split = make_split(ds, seed=args.seed)
    if ctx.is_main:
        split.save(own)
    return split, own


def _loaders(
    train: LabelledImages,
    val: LabelledImages,
    spec: PreprocessSpec,
    recipe: Recipe,
    args: argparse.Namespace,
    ctx: DistContext,
) -> tuple[Any, Any]:
    budget = int(args.cache_gb * (1 << 30))
    augment = augment_preset(recipe.augment)
    train_ds = RadiographDataset(train, spec, augment, args.seed, maybe_cache(train, spec.size, args.workers, budget))
    val_ds = RadiographDataset(val, spec, None, args.seed, maybe_cache(val, spec.size, args.workers, budget))
    sampler = make_sampler(recipe.sampler, train.labels, args.seed, ctx.rank, ctx.world_size)
    drop_last = len(sampler) >= recipe.batch_size  # a last batch of one image breaks BatchNorm
    train_loader = make_loader(train_ds, sampler, recipe.batch_size, args.workers, ctx.device, drop_last)
    val_shard = list(range(ctx.rank, len(val), ctx.world_size))  # unpadded: every image counted once
    val_loader = make_loader(val_ds, val_shard, recipe.batch_size, args.workers, ctx.device)
    return train_loader, val_loader


@dataclass
class PreparedModel:
    model: torch.nn.Module
    frozen_bn: list[str]
    n_frozen_convs: int
    init: dict[str, Any]


def _model(
    n_labels: int, spec: PreprocessSpec, recipe: Recipe, cfg: TrainConfig, args: argparse.Namespace, ctx: DistContext
) -> PreparedModel:
    torch.manual_seed(args.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    norm = resolve_init(args.init, args.arch, args.input_norm).norm
    model = build_model(args.arch, n_labels, hidden=recipe.hidden, dropout=recipe.dropout, input_norm=norm, spec=spec)
    init = load_initial_weights(model, args.init, args.input_norm)
    frozen_bn = freeze_early_convs(model, recipe.freeze_fraction)
    if recipe.bn == "frozen":
        frozen_bn = batchnorm_names(model)
    n_frozen = sum(1 for m in model.modules() if isinstance(m, torch.nn.Conv2d) and not m.weight.requires_grad)
    net: torch.nn.Module = model.to(ctx.device)
    if use_channels_last(ctx, cfg):
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if ctx.distributed:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
    torch.manual_seed(args.seed + 7919 * ctx.rank)  # dropout differs between ranks
    return PreparedModel(net, frozen_bn, n_frozen, init)


def train_config(recipe: Recipe, args: argparse.Namespace) -> TrainConfig:
    """The loop's settings from the resolved recipe and the run's options."""
    return TrainConfig(
        epochs=recipe.epochs, lr=recipe.lr, patience=recipe.patience, min_delta=recipe.min_delta, seed=args.seed,
        amp=not args.no_amp, log_steps=args.log_steps, optimizer=recipe.optimizer, weight_decay=recipe.weight_decay,
        backbone_lr_factor=recipe.backbone_lr_factor, schedule=recipe.schedule,
        warmup_fraction=recipe.warmup_fraction, ema_decay=recipe.ema_decay, checkpoint=recipe.checkpoint,
    )  # fmt: skip


def _run_record(
    args: argparse.Namespace,
    recipe: Recipe,
    ds: LabelledImages,
    spec: PreprocessSpec,
    split_path: Path,
    parts: dict[str, np.ndarray],
    pos_weight: np.ndarray,
    result: FitResult,
    prepared: PreparedModel,
    ctx: DistContext,
    seconds: float,
) -> dict[str, Any]:
    n_pos, n_neg = label_counts(ds.labels[parts["train"]])
    s = result.state
    augment = augment_preset(recipe.augment)
    return {
        "arch": args.arch, "family": get_backbone(args.arch).family, "hidden": recipe.hidden,
        "dropout": recipe.dropout, "labels": list(ds.label_names), "preprocess": asdict(spec),
        "data": str(args.data), "split": str(split_path), "n_images": {k: int(len(v)) for k, v in parts.items()},
        "train_counts": {"n_pos": n_pos.tolist(), "n_neg": n_neg.tolist()},
        "pos_weight": [float(w) for w in pos_weight], "loss": recipe.loss, "sampler": recipe.sampler,
        "recipe_name": args.recipe, "recipe": as_dict(recipe), "init": prepared.init,
        "input_norm": prepared.init["norm"], "augment": None if augment is None else asdict(augment),
        "lr": recipe.lr, "batch_size_per_process": recipe.batch_size, "world_size": ctx.world_size,
        "epochs_requested": recipe.epochs, "epochs_run": s.epoch, "best_epoch": s.best_epoch,
        "best_val_loss": s.best_val_loss, "stopped_early": s.stopped, "patience": recipe.patience,
        "min_delta": recipe.min_delta, "freeze_fraction": recipe.freeze_fraction,
        "frozen_convs": prepared.n_frozen_convs, "frozen_batchnorms": len(prepared.frozen_bn),
        "checkpoint": recipe.checkpoint, "history": result.history,
        "seed": args.seed, "seconds": round(s.seconds, 2), "wall_seconds_this_call": round(seconds, 2),
        "device": str(ctx.device) if ctx.device.type == "cpu" else torch.cuda.get_device_name(ctx.device),
        "torch": torch.__version__,
    }  # fmt: skip


def run_training(args: argparse.Namespace) -> dict[str, Any]:
    """Train one model as ``args`` say -> the run record (also written to RUN_DIR/run.json by rank 0).
    Raises CxrError / OSError / ValueError for bad inputs (missing data, bad split, empty split part)."""
    from training.data.load import load_dataset

    get_backbone(args.arch)  # ValueError for an unknown architecture, before any work
    recipe = recipe_from_args(args)
    if args.resume and not (Path(args.out) / "last.pt").is_file():
        raise FileNotFoundError(f"--resume: no last.pt in {args.out}")
    t0 = time.perf_counter()
    ctx = init_distributed(args.device)
    try:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        seed_everything(args.seed)
        ds = load_dataset(Path(args.data))
        split, split_path = resolve_split(ds, args, ctx)
        parts = cap_parts({k: split.indices(ds, k) for k in ("train", "val")}, args.max_images, args.seed)
        if min(len(v) for v in parts.values()) == 0:
            raise ValueError(f"empty split part: { ({k: len(v) for k, v in parts.items()}) }")
        train, val = ds.subset(parts["train"]), ds.subset(parts["val"])
        spec = PreprocessSpec(size=recipe.image_size)
        pos_weight = pos_weight_from_labels(train.labels)
        loss_fn = make_loss(recipe.loss, pos_weight).to(ctx.device)
        train_loader, val_loader = _loaders(train, val, spec, recipe, args, ctx)
        cfg = train_config(recipe, args)
        prepared = _model(len(ds.label_names), spec, recipe, cfg, args, ctx)
        result = fit(prepared.model, train_loader, val_loader, loss_fn, cfg, out, ctx, prepared.frozen_bn,
                     args.resume)  # fmt: skip
        record = _run_record(args, recipe, ds, spec, split_path, parts, pos_weight, result, prepared, ctx,
                             time.perf_counter() - t0)  # fmt: skip
        if ctx.is_main:
            (out / "run.json").write_text(json.dumps(record, indent=2) + "\n")
        barrier(ctx)
        return record
    finally:
        shutdown(ctx)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m training.train`` / torchrun. Exit 0 on success, 2 on bad input."""
    args = build_parser(description=__doc__.splitlines()[0]).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keep_freed_memory()
    from cxr.core.errors import CxrError

    try:
        record = run_training(args)
    except (CxrError, OSError, ValueError) as e:
        log.error("training failed: %s", e)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not per process
        kept = ("the last epoch's weights kept" if record["checkpoint"] == "last"
                else f"best epoch {record['best_epoch']} kept (val loss {record['best_val_loss']:.4f})")  # fmt: skip
        log.info("done: %d epochs, %s, in %.0f s", record["epochs_run"], kept, record["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
