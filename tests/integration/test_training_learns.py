"""Training *learns*, not only runs: a short CPU run on 64 real NIH radiographs must drive the training loss far
below the constant predictor's and rank the training images' findings almost perfectly, and the same bounds must
reject the classic ways a training pipeline silently learns nothing.

Setup (the real trainer ``training.trainer.fit``, real loss, real loader): MobileNetV3-Small from the ImageNet
state dict in ``../shared/data/pretrained`` (BatchNorm statistics frozen, linear head), the first 64 images of
``nih-cxr14-621`` at 96 px, no augmentation, AdamW one-cycle (head lr 3e-3, backbone 9e-4), 15 epochs of 2 batches.
Scored in eval mode on the same 64 images against their TRUE labels:

    ratio = weighted BCE / weighted BCE of the best constant predictor      bound: ratio <= 0.5
    mean AUROC over labels with both classes                                bound: AUROC >= 0.9

Measured on the 2-core CI machine (ratio, AUROC): the real run 0.010, 1.000; broken variants, which the
parametrised test below runs and requires to fail both bounds:
- broken optimiser (learning rate 0):                             1.017, 0.569
- frozen network (only the output biases can move):                1.011, 0.569
- labels re-shuffled among the images at every step (misaligned):  1.000, 0.500
- one fixed shuffle of the label rows (labels of other images):    9.780, 0.479
  (the network memorises the wrong labels, which the true labels expose; any training-set test relies on that)
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr.core.preprocess import PreprocessSpec
from cxr.models.architectures import build_model
from training.data.load import load_dataset
from training.distributed import DistContext
from training.ensemble_build import predict_logits
from training.init_weights import load_initial_weights
from training.losses import constant_predictor_loss, make_loss, pos_weight_from_labels
from training.metrics import mean_auroc
from training.torch_data import RadiographDataset, build_square_cache, make_loader
from training.trainer import TrainConfig, batchnorm_names, fit

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
NIH = SHARED / "nih-cxr14-621"
WEIGHTS = SHARED / "pretrained" / "mobilenet_v3_small_imagenet_torchvision.pth"
N_IMAGES, SIZE, EPOCHS = 64, 96, 15
MAX_LOSS_RATIO, MIN_AUROC = 0.5, 0.9


class _MisalignedLabels:
    """A loader whose labels are re-shuffled among the batch's images at every step (the bug where images and
    labels are shuffled separately)."""

    def __init__(self, loader: torch.utils.data.DataLoader) -> None:
        self.loader, self.sampler = loader, loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            yield x, y[torch.randperm(len(y))]


def train_and_score(fault: str) -> tuple[float, float]:
    """Train as the module docstring says with ``fault`` ("none", "zero_lr", "frozen", "misaligned",
    "fixed_shuffle") -> (loss / constant-predictor loss, mean AUROC), both on the true labels."""
    torch.manual_seed(0)
    images = load_dataset(NIH).subset(np.arange(N_IMAGES))
    seen = images
    if fault == "fixed_shuffle":
        seen = replace(images, labels=images.labels[np.random.default_rng(1).permutation(N_IMAGES)])
    spec = PreprocessSpec(size=SIZE)
    ctx = DistContext()
    data = RadiographDataset(seen, spec, None, 0, build_square_cache(seen.paths, SIZE, workers=0))
    loader = make_loader(data, list(range(N_IMAGES)), 32, 0, ctx.device)
    model = build_model("mobilenet_v3_small", len(images.label_names), hidden=0, dropout=0.0, input_norm="tf",
                        spec=spec)  # fmt: skip
    load_initial_weights(model, str(WEIGHTS), "tf")
    if fault == "frozen":
        for name, p in model.named_parameters():
            p.requires_grad_(name == "head.1.bias")
    pos_weight = pos_weight_from_labels(seen.labels)
    loss_fn = make_loss("wbce", pos_weight)
    cfg = TrainConfig(epochs=EPOCHS, lr=0.0 if fault == "zero_lr" else 3e-3, optimizer="adamw", weight_decay=0.0,
                      backbone_lr_factor=0.3, schedule="onecycle", checkpoint="last", patience=EPOCHS + 1)  # fmt: skip
    train_loader = _MisalignedLabels(loader) if fault == "misaligned" else loader
    with tempfile.TemporaryDirectory() as run_dir:
        fit(model, train_loader, loader, loss_fn, cfg, Path(run_dir), ctx, batchnorm_names(model))  # type: ignore[arg-type]
    logits = predict_logits([model.eval()], images, spec, ctx.device, workers=0)[:, 0]
    truth = images.labels.astype(np.float32)
    truth_weight = pos_weight_from_labels(truth)
    with torch.no_grad():
        loss = float(make_loss("wbce", truth_weight)(torch.from_numpy(logits), torch.from_numpy(truth)))
    ratio = loss / constant_predictor_loss(truth, truth_weight)
    return ratio, mean_auroc(truth, 1.0 / (1.0 + np.exp(-logits)))


def test_a_short_cpu_run_learns_the_training_images() -> None:
    ratio, auroc = train_and_score("none")
    assert ratio <= MAX_LOSS_RATIO, f"training loss is {ratio:.3f} x the constant predictor's"
    assert auroc >= MIN_AUROC, f"training-set mean AUROC {auroc:.3f}"


@pytest.mark.parametrize("fault", ["zero_lr", "frozen", "misaligned", "fixed_shuffle"])
def test_the_bounds_reject_a_pipeline_that_learns_nothing(fault: str) -> None:
    ratio, auroc = train_and_score(fault)
    assert ratio > MAX_LOSS_RATIO and auroc < MIN_AUROC, f"{fault}: ratio {ratio:.3f}, AUROC {auroc:.3f} pass"


def test_constant_predictor_loss_is_what_a_constant_model_scores() -> None:
    y = load_dataset(NIH).labels[:N_IMAGES].astype(np.float32)
    w = pos_weight_from_labels(y)
    pi = np.nanmean(y, axis=0).clip(1e-6, 1 - 1e-6)
    best = np.log(w * pi / (1 - pi))  # logit of w pi / (w pi + 1 - pi)
    logits = torch.from_numpy(np.tile(best, (len(y), 1)).astype(np.float32))
    loss = float(make_loss("wbce", w)(logits, torch.from_numpy(y)))
    assert loss == pytest.approx(constant_predictor_loss(y, w), rel=1e-4)
    assert float(make_loss("wbce", w)(logits + 0.3, torch.from_numpy(y))) > loss  # and it is a minimum
