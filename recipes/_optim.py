"""The recipes' optimizer: AdamW with weight decay on matrices only, per-step warm-up and cosine decay."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import nn


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices (ndim >= 2), none on biases, norms and scalars."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0
):
    """Linear warm-up to the base learning rate, then cosine decay to ``min_ratio`` of it at ``total_steps``."""
    total_steps = max(1, int(total_steps))
    warmup_steps = max(0, min(int(warmup_steps), total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def adamw_warmup_cosine(
    module: L.LightningModule, lr: float, weight_decay: float, warmup_steps: int, betas=(0.9, 0.999)
) -> dict[str, Any]:
    """``configure_optimizers`` result shared by the recipes: AdamW, per-step warm-up + cosine schedule."""
    optimizer = torch.optim.AdamW(param_groups(module, weight_decay), lr=lr, betas=tuple(betas))
    total = module.trainer.estimated_stepping_batches if module._trainer is not None else 1000
    if not math.isfinite(total):
        total = 1000
    scheduler = warmup_cosine(optimizer, warmup_steps, int(total))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
