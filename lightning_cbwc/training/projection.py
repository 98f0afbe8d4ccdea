"""Keep the projected writers centered while training: center their gradients as they accumulate, re-center
the weights after each optimizer step, and :func:`attach` both to a plain PyTorch optimizer.

The gradient is centered by a per-tensor post-accumulate-grad hook, so every later consumer (gradient
accumulation, GradScaler unscaling, the DDP all-reduce, ``clip_grad_norm_`` / ``clip_grad_value_`` in any
order, the optimizer) sees the LayerNorm model's gradient.  Projecting only the gradients is not enough:
Adam's per-coordinate scaling de-centers the update, hence the weight projection after the step.  Exact for
optimizers whose update reads the parameter only linearly; :func:`inexact_reason` names the others.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..centering import fast_center_, fast_center_all_, is_uncentered, scaled_column_mean
from ..errors import UnsupportedError
from .lora import lora_matrices, prepare_
from .state import converted_modules, effective, stored

#: the tensor attribute holding a gradient-centering hook handle (one hook per tensor)
_GRAD_HOOK = "_cbwc_grad_hook"


@dataclass(frozen=True)
class Target:
    """A tensor to keep centered over ``dim`` (scaled by ``scale``, a LayerScale, when given); ``name`` is
    relative to the module it was collected from.  ``zero_mean_grad``: its gradient is zero-mean by
    construction (:attr:`~lightning_cbwc.training.state.CBWCState.zero_mean_grads`), so only the weight
    needs re-centering after a step (Adam's per-coordinate scaling de-centers the update)."""

    name: str
    tensor: torch.Tensor
    dim: int
    scale: torch.Tensor | None = None
    zero_mean_grad: bool = False


def projection_targets(module: nn.Module) -> list[Target]:
    """Every tensor :func:`project_` keeps centered under ``module``: projected writers and LoRA B matrices.

    Resolved by name on each call (cheap, but callers that project every step may cache the list).
    """
    out: dict[int, Target] = {}
    states = converted_modules(module)
    for prefix, mod, state in states:
        pre = f"{prefix}." if prefix else ""
        for w in state.projected:
            t = stored(mod, w.param)
            scale = effective(mod, w.scale) if w.scale else None
            out.setdefault(id(t), Target(pre + w.param, t, w.dim, scale, state.zero_mean_grads))
    lora_exact = bool(states) and all(state.zero_mean_grads for _, _, state in states)
    for name, t, dim in lora_matrices(module):
        out.setdefault(id(t), Target(name, t, dim, zero_mean_grad=lora_exact))
    return list(out.values())


def _targets(module_or_targets: nn.Module | Iterable[Target]) -> Iterable[Target]:
    if isinstance(module_or_targets, nn.Module):
        return projection_targets(module_or_targets)
    return module_or_targets


@torch.no_grad()
def project_(module_or_targets: nn.Module | Iterable[Target]) -> int:
    """Re-center, in place, every trainable projected writer and LoRA B matrix; returns how many.

    Call after each ``optimizer.step()`` (:func:`attach` does).  Frozen tensors are skipped (they never move).
    """
    trainable = [tg for tg in _targets(module_or_targets) if tg.tensor.requires_grad]
    plain = [tg for tg in trainable if tg.scale is None]
    fast_center_all_([tg.tensor for tg in plain], [tg.dim for tg in plain])
    for tg in trainable:
        if tg.scale is not None:
            fast_center_(tg.tensor, tg.dim, tg.scale)
    return len(trainable)


@torch.no_grad()
def recenter_drifted_(targets: Iterable[Target]) -> int:
    """Re-center, in place, the trainable targets that are not centered (materialized from the meta device or
    loaded after the conversion); centered ones stay bit-identical (exact resume).  Returns how many."""
    n = 0
    for tg in targets:
        t = tg.tensor
        if t.requires_grad and not t.is_meta and is_uncentered(t, tg.dim, tg.scale):
            fast_center_(t, tg.dim, tg.scale)
            n += 1
    return n


@torch.no_grad()
def center_grad_(t: torch.Tensor, dim: int) -> None:
    """Center ``t.grad`` over ``dim`` in place; a sparse gradient is centered over its values (a row-sparse
    Embedding gradient, centered along the embedding dim)."""
    g = t.grad
    if g is None:
        return
    if not g.is_sparse:
        fast_center_(g, dim)
        return
    sparse_dims = g.sparse_dim()
    if dim < sparse_dims:
        raise UnsupportedError(
            f"a sparse gradient of shape {tuple(g.shape)} cannot be centered over its sparse dim {dim}: "
            "use a dense gradient (sparse=False) for this writer"
        )
    fast_center_(g._values(), dim - sparse_dims + 1)


@torch.no_grad()
def project_grads_(module_or_targets: nn.Module | Iterable[Target]) -> int:
    """Center, in place, the gradients of the projected writers now; returns how many.

    :func:`attach` does this as each gradient accumulates; call it by hand only for gradients written
    outside autograd.
    """
    n = 0
    for tg in _targets(module_or_targets):
        if tg.tensor.grad is not None:
            center_grad_(tg.tensor, tg.dim)
            n += 1
    return n


def center_grads_on_accumulate(targets: Iterable[Target]) -> list:
    """Register a post-accumulate-grad hook centering the gradient of each trainable target (one per tensor;
    a tensor that has one already is skipped, and so is a LayerScale writer left by :func:`unparametrize`,
    whose plain gradient centering would be wrong, and a target whose gradient is zero-mean by construction).
    Returns the new handles."""
    handles = []
    for tg in targets:
        t = tg.tensor
        if not t.requires_grad or tg.scale is not None or tg.zero_mean_grad:
            continue
        if getattr(t, _GRAD_HOOK, None) is not None:
            continue
        handle = t.register_post_accumulate_grad_hook(functools.partial(center_grad_, dim=tg.dim))
        setattr(t, _GRAD_HOOK, handle)
        handles.append((t, handle))
    return handles


#: optimizers whose coupled ``weight_decay`` (added to the gradient) feeds a nonlinear update
_COUPLED_DECAY = ("Adam", "Adagrad", "RMSprop", "Adamax", "RAdam", "NAdam", "Adadelta")


def inexact_reason(optimizer: torch.optim.Optimizer) -> str | None:
    """Why projection is not exact with ``optimizer`` (its update reads the parameter's column mean, which the
    LayerNorm model keeps and projection removes), or None for the optimizers where it is."""
    name = type(optimizer).__name__
    if name == "Adafactor":
        return "Adafactor scales its step by the parameter's RMS"
    known = [getattr(torch.optim, n) for n in _COUPLED_DECAY if hasattr(torch.optim, n)]
    if isinstance(optimizer, tuple(known)):
        for group in optimizer.param_groups:
            if group.get("weight_decay", 0) and not group.get("decoupled_weight_decay", False):
                decay = group["weight_decay"]
                return f"{name} with coupled (L2) weight_decay={decay} adds the parameter to its gradient"
    return None


class OptimizerHooks:
    """Handles of :func:`attach`'s hooks; ``targets``: what this optimizer keeps centered; ``remove()``
    detaches them."""

    def __init__(self, handles: list, targets: list[Target], grad_handles: list | None = None) -> None:
        self.handles = handles
        self.targets = targets
        self.grad_handles = grad_handles or []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for t, h in self.grad_handles:
            h.remove()
            if getattr(t, _GRAD_HOOK, None) is h:
                delattr(t, _GRAD_HOOK)
        self.handles, self.grad_handles = [], []


def attach(
    optimizer: torch.optim.Optimizer,
    module: nn.Module,
    *,
    grads: bool = True,
    targets: Sequence[Target] | None = None,
) -> OptimizerHooks:
    """Keep ``module``'s projected writers centered across ``optimizer`` steps (any training loop).

    Registers a step post-hook running :func:`project_` on the targets this optimizer updates and, with
    ``grads``, a post-accumulate-grad hook on each of them that centers its gradient as autograd writes it
    (before accumulation ends, unscaling, the DDP all-reduce, clipping and the step).  A step skipped by a
    GradScaler never calls the step hook, which is right: nothing moved.  Warns once when the optimizer is one
    where projection is not exact (:func:`inexact_reason`; ``mode="parametrize"`` is).  The target list is
    resolved now: call again after adding LoRA adapters.  Without ``targets``, runs
    :func:`~lightning_cbwc.training.lora.prepare_` first (peft layers added after the conversion).  Targets
    that arrive uncentered (materialized from the meta device after the conversion) are re-centered now.
    """
    if targets is None:
        prepare_(module)
    targets = list(projection_targets(module) if targets is None else targets)
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    mine = [t for t in targets if id(t.tensor) in ids]
    why = inexact_reason(optimizer) if any(t.tensor.requires_grad for t in mine) else None
    if why:
        warnings.warn(
            f"CBWC: {why}, so the {len(mine)} projected tensors ({mine[0].name}, ...) will not follow the "
            "LayerNorm model exactly. Convert with mode='parametrize' (exact for every optimizer), or use "
            "decoupled weight decay (AdamW).",
            stacklevel=2,
        )

    recenter_drifted_(mine)

    def post_hook(opt, args, kwargs) -> None:
        project_(mine)

    handles = [optimizer.register_step_post_hook(post_hook)]
    grad_handles = center_grads_on_accumulate(mine) if grads else []
    return OptimizerHooks(handles, mine, grad_handles)


@torch.no_grad()
def max_writer_column_mean(module: nn.Module) -> float:
    """Largest relative |column mean| (:func:`~lightning_cbwc.centering.max_column_mean`) over every writer
    (as the forward sees it, times its LayerScale) and LoRA B matrix under ``module``: ~1e-7 in float32 when
    all is well."""
    worst = 0.0
    for _, mod, state in converted_modules(module):
        for w in state.writers:
            if w.kind == "embedding_lookup":
                continue
            try:
                t = effective(mod, w.param)
                scale = effective(mod, w.scale) if w.scale else None
            except AttributeError:
                continue
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                worst = max(worst, scaled_column_mean(t, w.dim, scale))
    for tg in projection_targets(module):
        worst = max(worst, scaled_column_mean(tg.tensor, tg.dim, tg.scale))
    return worst
