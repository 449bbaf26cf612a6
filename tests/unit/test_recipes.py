"""Recipes and the training options: named defaults, explicit options win, bad settings are refused; the
optimiser groups, schedules and weight average the recipes ask for."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch

from cxr.models.architectures import build_model
from training.optimisation import make_ema, make_optimizer, make_schedule, param_groups
from training.options import build_parser, recipe_from_args
from training.recipes import PAPER, RECIPES, SMALL_DATA, Recipe, resolve
from training.trainer import TrainConfig, batchnorm_names

pytestmark = pytest.mark.unit
BASE = ["--data", "d", "--out", "o"]


def test_the_paper_recipe_is_the_paper() -> None:
    assert (PAPER.optimizer, PAPER.lr, PAPER.batch_size, PAPER.epochs, PAPER.patience) == ("adam", 1e-4, 32, 350, 25)
    assert (PAPER.hidden, PAPER.dropout, PAPER.freeze_fraction, PAPER.augment) == (512, 0.2, 0.1, "paper")
    assert PAPER.checkpoint == "best" and PAPER.min_delta == 0.001 and PAPER.loss == "wbce"


def test_options_default_to_the_named_recipe_and_explicit_ones_win() -> None:
    args = build_parser().parse_args([*BASE, "--recipe", "small-data"])
    assert recipe_from_args(args) == SMALL_DATA
    args = build_parser().parse_args([*BASE, "--recipe", "small-data", "--epochs", "3", "--hidden", "512"])
    r = recipe_from_args(args)
    assert (r.epochs, r.hidden, r.optimizer) == (3, 512, SMALL_DATA.optimizer)
    assert recipe_from_args(build_parser().parse_args([*BASE, "--no-augment"])).augment == "none"
    assert recipe_from_args(build_parser().parse_args(BASE)) == PAPER


def test_every_recipe_setting_has_an_option() -> None:
    option_names = {a.dest for a in build_parser()._actions}
    assert {f.name for f in fields(Recipe)} <= option_names


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown recipe"):
        resolve("fast", {})
    with pytest.raises(ValueError, match="optimizer"):
        resolve("paper", {"optimizer": "sgd"})
    with pytest.raises(ValueError, match="not recipe settings"):
        resolve("paper", {"colour": "blue"})
    with pytest.raises(SystemExit):
        build_parser().parse_args([*BASE, "--recipe", "fast"])
    assert set(RECIPES) == {"paper", "small-data"}


def _cfg(**kw: object) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "lr": 1e-3, **kw})  # type: ignore[arg-type]


def test_backbone_and_head_get_their_own_rates_and_no_decay_on_biases_and_norms() -> None:
    model = build_model("resnet18", 3, hidden=0)
    groups = param_groups(model, _cfg(backbone_lr_factor=0.1, weight_decay=1e-4))
    by_lr: dict[float, int] = {}
    for g in groups:
        by_lr[round(g["lr"], 9)] = by_lr.get(round(g["lr"], 9), 0) + len(g["params"])
        assert g["weight_decay"] == (1e-4 if all(p.ndim >= 2 for p in g["params"]) else 0.0)
        assert all(p.ndim >= 2 for p in g["params"]) or all(p.ndim < 2 for p in g["params"])
    assert by_lr[1e-3] == 2 and by_lr[1e-4] == len(list(model.backbone.parameters()))
    frozen = build_model("resnet18", 3, hidden=0)
    frozen.backbone.requires_grad_(False)
    assert sum(len(g["params"]) for g in param_groups(frozen, _cfg())) == 2  # frozen tensors left out
    assert isinstance(make_optimizer(model, _cfg(optimizer="adamw")), torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer(model, _cfg(optimizer="sgd"))


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_schedules_warm_up_then_decay_to_nearly_nothing(schedule: str) -> None:
    model = build_model("resnet18", 3, hidden=0)
    cfg = _cfg(schedule=schedule, epochs=5, warmup_fraction=0.2)
    opt = make_optimizer(model, cfg)
    sched = make_schedule(opt, cfg, steps_per_epoch=10)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[-1]["lr"])
        opt.step()
        sched.step()
    peak = max(lrs)
    assert math.isclose(peak, 1e-3, rel_tol=0.05) and 8 <= lrs.index(peak) <= 11  # peak after 20% of the steps
    assert lrs[0] < 0.5 * peak and lrs[-1] < 0.05 * peak
    assert make_schedule(opt, _cfg(schedule="constant"), 10) is None
    with pytest.raises(ValueError, match="schedule"):
        make_schedule(opt, _cfg(schedule="linear"), 10)


def test_the_weight_average_follows_the_weights() -> None:
    model = build_model("resnet18", 3, hidden=0)
    assert make_ema(model, _cfg()) is None
    ema = make_ema(model, _cfg(ema_decay=0.5))
    w0 = model.head[1].weight.detach().clone()
    ema.update_parameters(model)  # the first update copies
    with torch.no_grad():
        model.head[1].weight.add_(1.0)
    ema.update_parameters(model)  # then decay * average + (1 - decay) * weights
    assert torch.allclose(ema.module.head[1].weight, w0 + 0.5, atol=1e-6)


def test_frozen_batchnorm_keeps_its_statistics_in_training() -> None:
    from training.trainer import set_train_mode

    model = build_model("resnet18", 3, hidden=0)
    names = batchnorm_names(model)
    assert len(names) == 20
    set_train_mode(model, names)
    before = model.backbone[1].running_mean.clone()
    model(torch.randn(4, 1, 32, 32) * 5 + 3)
    assert torch.equal(model.backbone[1].running_mean, before)
