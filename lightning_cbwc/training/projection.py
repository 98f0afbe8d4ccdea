"""Keep the writers centered while training: project the weights after each optimizer step, center the
gradients before it, and :func:`attach` both to a plain PyTorch optimizer.

Projecting only the gradients is not enough: Adam's per-coordinate scaling de-centers the update, hence the
weight projection after the step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..centering import max_column_mean
from .lora import lora_matrices, prepare_
from .state import converted_modules, effective, stored


@dataclass(frozen=True)
class Target:
    """A tensor to keep centered over ``dim``; ``name`` is relative to the module it was collected from."""

    name: str
    tensor: torch.Tensor
    dim: int


def projection_targets(module: nn.Module) -> list[Target]:
    """Every tensor :func:`project_` keeps centered under ``module``: projected writers and LoRA B matrices.

    Resolved by name on each call (cheap, but callers that project every step may cache the list).
    """
    out: dict[int, Target] = {}
    for prefix, mod, state in converted_modules(module):
        pre = f"{prefix}." if prefix else ""
        for w in state.projected:
            t = stored(mod, w.param)
            out.setdefault(id(t), Target(pre + w.param, t, w.dim))
    for name, t, dim in lora_matrices(module):
        out.setdefault(id(t), Target(name, t, dim))
    return list(out.values())


def _center_fast_(t: torch.Tensor, dim: int) -> None:
    """``t -= mean(t, dim)`` in place; 16-bit tensors are centered in float32 and rounded once."""
    if t.dtype in (torch.float16, torch.bfloat16):
        f = t.float()
        t.copy_(f.sub_(f.mean(dim=dim, keepdim=True)))
    else:
        t.sub_(t.mean(dim=dim, keepdim=True))


def _targets(module_or_targets: nn.Module | Iterable[Target]) -> Iterable[Target]:
    if isinstance(module_or_targets, nn.Module):
        return projection_targets(module_or_targets)
    return module_or_targets


@torch.no_grad()
def project_(module_or_targets: nn.Module | Iterable[Target]) -> int:
    """Re-center, in place, every trainable projected writer and LoRA B matrix; returns how many.

    Call after each ``optimizer.step()`` (:func:`attach` does).  Frozen tensors are skipped (they never move).
    """
    n = 0
    for tg in _targets(module_or_targets):
        if tg.tensor.requires_grad:
            _center_fast_(tg.tensor, tg.dim)
            n += 1
    return n


@torch.no_grad()
def project_grads_(module_or_targets: nn.Module | Iterable[Target]) -> int:
    """Center, in place, the gradients of the projected writers; returns how many.

    Call before ``optimizer.step()`` (after unscaling, before clipping) so that the optimizer sees the
    gradient the LayerNorm model would have had.  Sparse gradients are left alone.
    """
    n = 0
    for tg in _targets(module_or_targets):
        g = tg.tensor.grad
        if g is not None and not g.is_sparse:
            _center_fast_(g, tg.dim)
            n += 1
    return n


class OptimizerHooks:
    """Handles of :func:`attach`'s optimizer hooks; ``targets``: what this optimizer keeps centered;
    ``remove()`` detaches the hooks."""

    def __init__(self, handles: list, targets: list[Target]) -> None:
        self.handles = handles
        self.targets = targets

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def attach(
    optimizer: torch.optim.Optimizer,
    module: nn.Module,
    *,
    grads: bool = True,
    targets: Sequence[Target] | None = None,
) -> OptimizerHooks:
    """Keep ``module``'s writers centered across ``optimizer`` steps (plain PyTorch training loops).

    Registers a step post-hook that runs :func:`project_` on the targets this optimizer updates and, with
    ``grads``, a step pre-hook running :func:`project_grads_` on them (for ``step(closure)``, as Lightning's
    automatic optimization calls it, right after the closure computed the gradients; Lightning has clipped them
    by then: the :class:`~lightning_cbwc.CBWC` callback centers before clipping).  A step skipped by a
    GradScaler never calls the hooks, which is right: nothing moved.  Under DDP the gradients must be centered
    after the all-reduce, which is the case here (the hooks run in ``optimizer.step``).  The target list is
    resolved now: call again after adding LoRA adapters.  Without ``targets``, runs
    :func:`~lightning_cbwc.training.lora.prepare_` first (peft layers added after the conversion).
    """
    if targets is None:
        prepare_(module)
    targets = list(projection_targets(module) if targets is None else targets)
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    mine = [t for t in targets if id(t.tensor) in ids]

    def post_hook(opt, args, kwargs) -> None:
        project_(mine)

    def pre_hook(opt, args, kwargs):
        # optimizer.step(closure): the gradients only exist once the closure ran (Lightning's automatic
        # optimization, LBFGS): center them right after it instead of now
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            project_grads_(mine)
            return None

        def closure_then_center():
            out = closure()
            project_grads_(mine)
            return out

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_center}
        return (args[0], closure_then_center, *args[2:]), kwargs

    handles = [optimizer.register_step_post_hook(post_hook)]
    if grads:
        handles.append(optimizer.register_step_pre_hook(pre_hook))
    return OptimizerHooks(handles, mine)


@torch.no_grad()
def max_writer_column_mean(module: nn.Module) -> float:
    """Largest relative |column mean| (:func:`~lightning_cbwc.centering.max_column_mean`) over every writer
    (as the forward sees it) and LoRA B matrix under ``module``: ~1e-7 in float32 when all is well."""
    worst = 0.0
    for _, mod, state in converted_modules(module):
        for w in state.writers:
            if w.kind == "embedding_lookup":
                continue
            try:
                t = effective(mod, w.param)
            except AttributeError:
                continue
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                worst = max(worst, max_column_mean(t, w.dim))
    for tg in projection_targets(module):
        worst = max(worst, max_column_mean(tg.tensor, tg.dim))
    return worst
