"""What the training loop steps besides the model: the optimiser (Adam / AdamW, per-group learning rates and
weight decay), the per-step learning-rate schedule and the exponential moving average of the weights."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from training.distributed import unwrap

if TYPE_CHECKING:
    from training.trainer import TrainConfig


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Trainable parameters in up to four groups: backbone / head x decayed / not decayed (biases and
    normalisation parameters, i.e. every tensor with fewer than two dimensions, get no weight decay)."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        key = (name.startswith("head."), p.ndim >= 2)
        groups.setdefault(key, []).append(p)
    out = []
    for (is_head, decayed), params in sorted(groups.items()):
        lr = cfg.lr if is_head else cfg.lr * cfg.backbone_lr_factor
        out.append({"params": params, "lr": lr, "weight_decay": cfg.weight_decay if decayed else 0.0})
    return out


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam or AdamW over ``param_groups``. Raises ValueError for another name."""
    groups = param_groups(model, cfg)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def make_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> Any:
    """A per-step learning-rate schedule, or None for a constant rate. Raises ValueError for an unknown one."""
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "constant":
        return None
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total, pct_start=cfg.warmup_fraction,
            anneal_strategy="cos", cycle_momentum=False, div_factor=25.0, final_div_factor=1e3,
        )  # fmt: skip
    if cfg.schedule == "cosine":
        warm = max(1, round(cfg.warmup_fraction * total))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def make_ema(model: nn.Module, cfg: TrainConfig) -> Any:
    """An exponential moving average of the weights and buffers (None when ``ema_decay`` is 0)."""
    if cfg.ema_decay <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(unwrap(model), multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)


def judged_model(model: nn.Module, ema: Any) -> nn.Module:
    """The weights that are validated and saved: the EMA's when there is one."""
    return ema.module if ema is not None else unwrap(model)


@dataclass
class Optimisation:
    """What the loop steps: the optimiser, its schedule (or None) and the weight average (or None)."""

    opt: torch.optim.Optimizer
    schedule: Any = None
    ema: Any = None

    def step(self, model: nn.Module) -> None:
        self.opt.step()
        if self.schedule is not None:
            self.schedule.step()
        if self.ema is not None:
            self.ema.update_parameters(unwrap(model))

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.opt.state_dict(),
                "schedule": None if self.schedule is None else self.schedule.state_dict(),
                "ema": None if self.ema is None else self.ema.state_dict()}  # fmt: skip

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.opt.load_state_dict(d["optimizer"])
        if self.schedule is not None and d.get("schedule") is not None:
            self.schedule.load_state_dict(d["schedule"])
        if self.ema is not None and d.get("ema") is not None:
            self.ema.load_state_dict(d["ema"])
