"""Optimizers and schedules: no weight decay on norm/bias and the model's `no_weight_decay()`, per-group LR
multipliers, warmup + cosine/step."""

from __future__ import annotations

import math

import torch
from torch import nn

from tlkit.config import OptimConfig


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameters the model itself says take no weight decay (timm's `no_weight_decay()`, e.g. a ViT's
    `pos_embed` and `cls_token`, and `no_weight_decay_keywords()`, e.g. Swin's relative position tables)."""
    names = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    keywords = set(model.no_weight_decay_keywords()) if hasattr(model, "no_weight_decay_keywords") else set()
    return {
        n
        for n, _ in model.named_parameters()
        if n in names or any(n.endswith("." + x) for x in names) or any(k in n for k in keywords)
    }


def param_groups(model: nn.Module, weight_decay: float, lr_mults: dict[str, float] | None = None) -> list[dict]:
    """Groups keyed by (lr multiplier, decay?): 1-d tensors (norm weights, biases) and what the model lists in
    `no_weight_decay()` get no weight decay, as in the ResNet and ViT training references; `lr_mults` maps
    parameter name -> lr multiplier."""
    lr_mults = lr_mults or {}
    skip = no_decay_names(model)
    groups: dict[tuple[float, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and not name.endswith(".bias") and name not in skip
        mult = lr_mults.get(name, 1.0)
        group = groups.setdefault(
            (mult, decay),
            {
                "params": [],
                "names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_mult": mult,
            },
        )
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    lr: float,
    *,
    device_type: str = "cpu",
    lr_mults: dict[str, float] | None = None,
) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, lr_mults)
    for g in groups:
        g["lr"] = lr * g["lr_mult"]
        g["initial_lr"] = g["lr"]
        g.pop("names")
    # Fused kernels on CUDA (one launch for all params); foreach elsewhere.
    speed = {"fused": True} if device_type == "cuda" else {"foreach": True}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **speed)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **speed)
    raise ValueError(f"unknown optimizer {cfg.name!r}; use sgd or adamw")


def recipe_lr(optimizer: torch.optim.Optimizer) -> float:
    """The run's LR at this point of the schedule, before per-group multipliers: what metrics.jsonl, TensorBoard
    and the progress bar show. (Group 0 is the stem, which layer decay puts far below it.)"""
    for group in optimizer.param_groups:
        if group.get("lr_mult", 1.0) > 0:
            return group["lr"] / group.get("lr_mult", 1.0)
    return 0.0


def lr_factor(step: int, total_steps: int, warmup_steps: int, cfg: OptimConfig, steps_per_epoch: int) -> float:
    """Multiplier on the base LR at a given optimizer step: linear warmup, then cosine / step / constant."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if cfg.schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine
    if cfg.schedule == "step":
        return cfg.gamma ** ((step // max(1, steps_per_epoch)) // cfg.step_size)
    if cfg.schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {cfg.schedule!r}; use cosine, step or constant")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step (not per epoch), so warmup is smooth on any dataset size."""
    total = epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, cfg, steps_per_epoch)
    )


class ModelEma:
    """Exponential moving average of weights (and buffers), kept in fp32 beside the model.

    The decay warms up as in timm's ModelEmaV3: update t uses min(decay, 1 - (1 + t)^(-2/3)), so the first
    updates follow the weights closely instead of anchoring the average at the initial (pretrained or random)
    weights for thousands of steps. `updates` is saved in checkpoints (`ema_updates`) so a resumed run
    continues the same ramp."""

    WARMUP_POWER = 2 / 3

    def __init__(self, model: nn.Module, decay: float, *, updates: int = 0):
        self.decay = decay
        self.updates = updates
        self.shadow = {
            k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
            for k, v in model.state_dict().items()
        }

    def current_decay(self) -> float:
        """The decay the next update applies."""
        return min(self.decay, 1.0 - (1.0 + self.updates) ** -self.WARMUP_POWER)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.detach().float(), 1 - decay)
            else:
                self.shadow[k].copy_(v)
        self.updates += 1

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)
