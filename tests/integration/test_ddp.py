"""A real two-process DistributedDataParallel run (torchrun, gloo on CPU) against a single process on the same
global batch: same seed, same data order (the samplers shard one global permutation), so the global loss of
the first optimiser steps must agree.

Why the backbone is frozen (--freeze-fraction 1.0) and dropout is 0 here: in training mode BatchNorm normalises
with the statistics of the batch it sees, 4 images per rank against 8 in one process (SyncBatchNorm would fix
that but needs CUDA), and each process draws its own dropout masks. With frozen BatchNorm (running statistics)
and no dropout, every image's logits are independent of the batch, so the first-step loss must match up to the
order of float32 sums (tolerance: relative 1e-5), and the following steps, whose gradients DDP averages over
ranks, up to Adam's amplification of those rounding differences (relative 1e-4).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cxr.stack.processes import free_port
from training.data.load import load_dataset
from training.splits import make_split

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
NIH = REPO.parent / "shared" / "data" / "nih-cxr14-621"
GLOBAL_BATCH = 8
STEPS = 3


def _args(split: Path, out: Path, batch: int) -> list[str]:
    fixed = ["--arch", "resnet18", "--epochs", "1", "--image-size", "32", "--max-images", "40", "--hidden", "16",
             "--dropout", "0", "--freeze-fraction", "1.0", "--workers", "0", "--device", "cpu"]  # fmt: skip
    return ["--data", str(NIH), "--split", str(split), "--out", str(out), *fixed, "--log-steps", str(STEPS),
            "--batch-size", str(batch)]  # fmt: skip


def _steps(run: Path) -> list[tuple[int, float, int]]:
    with open(run / "steps.csv", newline="") as f:
        return [(int(r["step"]), float(r["loss"]), int(r["n_targets"])) for r in csv.DictReader(f)]


def test_two_process_ddp_matches_one_process_on_the_same_global_batch(tmp_path: Path) -> None:
    split = tmp_path / "split.json"
    make_split(load_dataset(NIH), seed=0).save(split)
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}"]  # fmt: skip
    cmd = [*launcher, "-m", "training.train", *_args(split, ddp_dir, GLOBAL_BATCH // 2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    from training.train import main

    assert main(_args(split, single_dir, GLOBAL_BATCH)) == 0

    ddp, single = _steps(ddp_dir), _steps(single_dir)
    assert [s for s, _, _ in ddp] == list(range(1, STEPS + 1)) == [s for s, _, _ in single]
    assert all(n == GLOBAL_BATCH * 15 for _, _, n in ddp + single)  # the whole global batch, 15 labels
    assert ddp[0][1] == pytest.approx(single[0][1], rel=1e-5)
    for (_, loss_ddp, _), (_, loss_single, _) in zip(ddp[1:], single[1:], strict=True):
        assert loss_ddp == pytest.approx(loss_single, rel=1e-4)
    assert len({round(loss, 4) for _, loss, _ in single}) == STEPS  # the steps really differ: training happened

    rec_ddp = json.loads((ddp_dir / "run.json").read_text())
    rec_single = json.loads((single_dir / "run.json").read_text())
    assert rec_ddp["world_size"] == 2 and rec_single["world_size"] == 1
    with open(ddp_dir / "metrics.csv", newline="") as f:
        rows_ddp = list(csv.DictReader(f))
    with open(single_dir / "metrics.csv", newline="") as f:
        rows_single = list(csv.DictReader(f))
    assert len(rows_ddp) == 1  # written once, by rank 0
    # validation is sharded over the ranks without padding, then all-reduced: the same images, the same loss
    assert float(rows_ddp[0]["val_loss"]) == pytest.approx(float(rows_single[0]["val_loss"]), rel=1e-5)
    assert float(rows_ddp[0]["val_auroc_mean"]) == pytest.approx(float(rows_single[0]["val_auroc_mean"]), abs=1e-9)
