"""convert(): make a LayerNorm model train as a CBWC + RMSNorm model, in place, with the same function.

    plan = lightning_cbwc.convert(model, (x,))            # analysis, exact centering, LayerNorm -> RMSNorm
    handle = lightning_cbwc.attach(optimizer, model)      # keep the writers centered after every step

What :func:`convert` does (once: a second call is a no-op, the module carries the attribute
``_cbwc_converted`` holding a :class:`CBWCState` with the plan):

1. capture + analyze (:mod:`lightning_cbwc.analysis`): which LayerNorms fold, and the *writers* (parameters
   whose output dim ends up as a folded norm's normalized dim) that must be column-centered;
2. center every writer exactly (float64, cast back), fold LayerScales into their writer (the scale is then
   frozen at 1: see :class:`CBWCState`), center tied embedding tables at the lookup;
3. swap each foldable LayerNorm for an RMSNorm that adopts the LayerNorm's own ``weight``/``bias`` Parameter
   objects (optimizers, DDP, peft freezing and state-dict keys survive);
4. keep the writers centered during training, by one of two modes:

   * ``mode="project"`` (default): nothing changes in the forward.  After each optimizer step the writers are
     re-centered in place (:func:`project_`), and before each step their gradients are centered
     (:func:`project_grads_`).  Both are needed for the model to train *exactly* like the LayerNorm model:
     the LayerNorm model's gradient is already centered (LayerNorm ignores a uniform shift), so centering the
     CBWC gradient gives Adam the same moments; projecting only the gradients is not enough because Adam's
     per-coordinate scaling de-centers the update, hence the weight projection after the step.
   * ``mode="parametrize"``: ``torch.nn.utils.parametrize`` with :class:`~lightning_cbwc.parametrize.Centering`
     on Linear / Conv / HF-Conv1D writers: W = V - mean_out(V), gradients through the centering, V trained.
     Embedding tables, parameters added straight into the stream (cls / position embeddings), frozen writers
     and LoRA matrices are projected even in this mode (parametrizing a vocab-sized table recomputes it on every
     forward; a frozen writer never moves).

   Both modes give the LayerNorm model's losses step by step (up to rounding).  ``project`` is the default
   because it is cheaper: four passes over the writers per optimizer step (0.4% of a ViT-S step, 0.7% of a
   GPT-2 small step on this CPU, ``benchmarks/bench_training.py``), where ``parametrize`` centers in every
   forward and backward of every micro-batch (+1 to +6% over the plain RMSNorm swap), and the renamed
   parameters of parametrize confuse code that walks ``named_parameters()``.

State dicts keep the plain ``weight``/``bias`` keys in both modes (see :mod:`lightning_cbwc.parametrize`).  In
project mode a load post-hook re-centers writers that arrive uncentered (e.g. a vanilla LayerNorm checkpoint
loaded into the converted model: exact, as LayerNorm ignores the shift) and leaves centered ones bit-identical.

Without Lightning: call :func:`convert` (e.g. in ``configure_model`` or before building the optimizer) and
:func:`attach` on the optimizer, or call :func:`project_grads_` before and :func:`project_` after each
``optimizer.step()`` yourself.  The :class:`lightning_cbwc.CBWC` callback does all of it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize as P

from .analysis import FoldPlan, Writer, analyze_captured, capture
from .centering import center_, fold_scale_, max_column_mean
from .errors import FoldingError, UnsupportedError
from .fold import _Undo, center_writers, swap_norms
from .parametrize import is_centered_parametrization, original, parametrize_, unparametrize_
from .verify import max_relative_error, run, tolerance

log = logging.getLogger("lightning_cbwc")

MARKER = "_cbwc_converted"
MODES = ("project", "parametrize")
#: writer kinds that mode="parametrize" parametrizes (the others are projected)
PARAMETRIZE_KINDS = ("linear", "conv1d", "conv")


@dataclass
class CBWCState:
    """What :func:`convert` did to a module; stored on it as ``module._cbwc_converted``.

    ``parametrized``: writers kept centered by a parametrization.  ``projected``: writers re-centered by
    :func:`project_` (all writers in project mode; embeddings, stream parameters and frozen writers in
    parametrize mode).  ``frozen_scales``: LayerScale parameters folded into their writer at conversion and
    frozen at 1 (the scale is redundant with the writer's rows; training it would de-center the stream).
    ``norms``: the swapped norm modules.  ``max_error``: the conversion check's max relative output error.
    """

    plan: FoldPlan
    mode: str
    parametrized: list[Writer] = field(default_factory=list)
    projected: list[Writer] = field(default_factory=list)
    frozen_scales: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    max_error: float | None = None

    @property
    def writers(self) -> list[Writer]:
        return self.plan.writers

    def summary(self) -> str:
        plan = self.plan
        return (
            f"CBWC ({self.mode}): {plan.summary()}; {len(self.parametrized)} writers parametrized, "
            f"{len(self.projected)} projected"
            + (f", {len(self.frozen_scales)} LayerScales folded" if self.frozen_scales else "")
        )


@dataclass(frozen=True)
class Target:
    """A tensor to keep centered over ``dim``; ``name`` is relative to the module it was collected from."""

    name: str
    tensor: torch.Tensor
    dim: int


# ------------------------------------------------------------------------------------- lookups


def converted_state(module: nn.Module) -> CBWCState | None:
    """The :class:`CBWCState` of ``module`` itself, or None when it was not converted."""
    state = module.__dict__.get(MARKER)
    return state if isinstance(state, CBWCState) else None


def converted_modules(module: nn.Module) -> list[tuple[str, nn.Module, CBWCState]]:
    """(name, module, state) of ``module`` and every converted module under it ('' for ``module`` itself)."""
    out = []
    for name, mod in module.named_modules(remove_duplicate=True):
        state = converted_state(mod)
        if state is not None:
            out.append((name, mod, state))
    return out


def is_converted(module: nn.Module) -> bool:
    """True when ``module`` or a module under it was converted."""
    return bool(converted_modules(module))


def owner(root: nn.Module, qualname: str) -> tuple[nn.Module, str]:
    """(module, attribute) holding the tensor ``qualname`` of ``root``.

    Follows peft's ``base_layer`` when a writer layer was wrapped by peft after the conversion.
    """
    path, _, attr = qualname.rpartition(".")
    mod = root.get_submodule(path) if path else root
    while (
        attr not in mod._parameters
        and attr not in mod._buffers
        and not P.is_parametrized(mod, attr)
        and isinstance(getattr(mod, "base_layer", None), nn.Module)
    ):
        mod = mod.base_layer
    return mod, attr


def _tensor(root: nn.Module, qualname: str) -> torch.Tensor:
    """The stored tensor (parametrization original, parameter or buffer) behind ``qualname``."""
    mod, attr = owner(root, qualname)
    try:
        return original(mod, attr)
    except AttributeError:
        raise AttributeError(f"{qualname}: no such parameter or buffer under {type(root).__name__}") from None


def _effective(root: nn.Module, qualname: str) -> torch.Tensor:
    """The tensor the forward uses (the centered value for a parametrized writer)."""
    mod, attr = owner(root, qualname)
    return getattr(mod, attr)


def projection_targets(module: nn.Module) -> list[Target]:
    """Every tensor :func:`project_` keeps centered under ``module``: projected writers and LoRA B matrices.

    Resolved by name on each call (cheap, but callers that project every step may cache the list).
    """
    from .lora import lora_targets

    out: dict[int, Target] = {}
    for prefix, mod, state in converted_modules(module):
        pre = f"{prefix}." if prefix else ""
        for w in state.projected:
            t = _tensor(mod, w.param)
            out.setdefault(id(t), Target(pre + w.param, t, w.dim))
        for w in state.writers:
            if w.kind == "parameter" or not w.param.endswith(".weight"):
                continue
            layer_path = w.param.rpartition(".")[0]
            try:
                layer = mod.get_submodule(layer_path)
            except AttributeError:
                continue
            for name, t, dim in lora_targets(layer):
                out.setdefault(id(t), Target(f"{pre}{layer_path}.{name}", t, dim))
    return list(out.values())


# ------------------------------------------------------------------------------------- projection


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
    """Handles of :func:`attach`'s optimizer hooks; ``remove()`` detaches them."""

    def __init__(self, handles: list) -> None:
        self.handles = handles

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
    after the all-reduce, which is the case here (the hooks run in ``optimizer.step``).  The target list is resolved now: call again after adding
    LoRA adapters.  Runs :func:`lightning_cbwc.lora.prepare_` first (peft layers added after the conversion).
    """
    from .lora import prepare_

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
    return OptimizerHooks(handles)


# ------------------------------------------------------------------------------------- statistics


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
                t = _effective(mod, w.param)
            except AttributeError:
                continue
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                worst = max(worst, max_column_mean(t, w.dim))
    for tg in projection_targets(module):
        worst = max(worst, max_column_mean(tg.tensor, tg.dim))
    return worst


# ------------------------------------------------------------------------------------- load hook


def _eps_limit(t: torch.Tensor) -> float:
    return 8 * torch.finfo(t.dtype).eps


@torch.no_grad()
def _recenter_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    """Load post-hook: re-fold LayerScales that came back != 1 and re-center projected writers that came back
    uncentered (a vanilla LayerNorm checkpoint); centered writers are left bit-identical (exact resume)."""
    state = converted_state(module)
    if state is None:
        return
    refold = []
    for name in state.frozen_scales:
        try:
            g = _tensor(module, name)
        except AttributeError:
            continue
        if not bool((g == 1).all()):
            refold.append((name, g))
    for name, g in refold:
        for w in state.writers:
            if w.scale == name:
                fold_scale_(_tensor(module, w.param), g, w.dim)
        g.fill_(1)
    fixed = 0
    for w in state.projected:
        try:
            t = _tensor(module, w.param)
        except AttributeError:
            continue
        if t.is_floating_point() and max_column_mean(t, w.dim) > _eps_limit(t):
            center_(t, w.dim)
            fixed += 1
    if fixed or refold:
        log.info(
            "CBWC: re-centered %d writers and re-folded %d LayerScales after load_state_dict",
            fixed,
            len(refold),
        )


# ------------------------------------------------------------------------------------- convert


def check_supported(module: nn.Module) -> None:
    """Raise UnsupportedError for parameter layouts where column projection is wrong or impossible."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    except Exception:  # pragma: no cover - torch without distributed
        FSDP1 = ()
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover
        DTensor = ()
    for name, mod in module.named_modules():
        if FSDP1 and isinstance(mod, FSDP1):
            raise UnsupportedError(
                f"{name or type(module).__name__} is wrapped by FSDP1: its flat parameters make per-column "
                "centering wrong. Convert before wrapping with DDP, or use strategy='ddp'."
            )
    for name, p in module.named_parameters():
        if DTensor and isinstance(p, DTensor):
            raise UnsupportedError(
                f"{name} is a DTensor (FSDP2 / tensor parallel): CBWC projection of sharded parameters is not "
                "supported yet. Convert the model before sharding it is not enough either; use strategy='ddp'."
            )
        if type(p).__name__ == "FlatParameter":
            raise UnsupportedError(f"{name} is an FSDP1 FlatParameter: CBWC is not supported with FSDP1")
    from .lora import check_peft

    check_peft(module)


def _as_args(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


def convert(
    module: nn.Module,
    example_inputs: Any,
    example_kwargs: dict[str, Any] | None = None,
    *,
    mode: str = "project",
    check: bool = True,
    tol: float | None = None,
) -> FoldPlan:
    """Convert ``module`` in place for CBWC training and return the :class:`~lightning_cbwc.FoldPlan`.

    ``example_inputs`` (a tuple of positional args, or one tensor) and ``example_kwargs``: what ``module`` is
    called with (it is captured with ``torch.export`` in eval mode).  ``mode``: ``"project"`` or
    ``"parametrize"`` (see the module docstring).  With ``check`` the outputs on the example inputs are compared
    with the unconverted model's; beyond a dtype-aware tolerance (or ``tol``) the conversion is rolled back and
    :class:`~lightning_cbwc.FoldingError` is raised.

    Idempotent: a converted module carries ``_cbwc_converted`` (a :class:`CBWCState`); converting it again,
    or converting a parent of a converted module, returns the existing plan and changes nothing.  With no
    foldable LayerNorm it warns and changes nothing (the marker is still set, so the analysis is not redone).
    Raises :class:`~lightning_cbwc.CaptureError` (with a hint) when the model cannot be captured and
    :class:`~lightning_cbwc.UnsupportedError` for FSDP / DTensor parameters, DoRA and base-modifying LoRA inits.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    state = converted_state(module)
    if state is not None:
        if state.mode != mode:
            warnings.warn(
                f"{type(module).__name__} was already converted with mode={state.mode!r}; ignoring mode={mode!r}",
                stacklevel=2,
            )
        return state.plan
    inner = converted_modules(module)
    if inner:
        name, _, state = inner[0]
        log.info("CBWC: %s is already converted; not converting %s again", name, type(module).__name__)
        return state.plan
    check_supported(module)
    args = _as_args(example_inputs)
    kwargs = dict(example_kwargs or {})
    ref = run(module, args, kwargs) if check else None
    cap = capture(module, args, kwargs)
    plan = analyze_captured(cap)
    state = CBWCState(plan=plan, mode=mode)
    if not plan.foldable:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in plan.not_foldable[:3])
        warnings.warn(
            f"CBWC: nothing to convert in {type(module).__name__} ({plan.summary()})"
            + (f": {reasons}" if reasons else "")
            + ". The model is left unchanged.",
            stacklevel=2,
        )
        object.__setattr__(module, MARKER, state)
        return plan

    undo = _Undo()
    registered: list[tuple[nn.Module, str]] = []
    try:
        center_writers(module, plan, undo)
        swap_norms(module, plan, undo)
        state.norms = [s.name for s in plan.foldable]
        scales = sorted({w.scale for w in plan.writers if w.scale})
        for name in scales:
            g = _tensor(module, name)
            if g.requires_grad:
                undo.steps.append(lambda g=g: g.requires_grad_(True))
                g.requires_grad_(False)
        state.frozen_scales = scales
        for w in plan.writers:
            if w.kind == "embedding_lookup":
                continue
            mod, attr = owner(module, w.param)
            t = mod._parameters.get(attr)
            lora = "lora_" in w.param
            if (
                mode == "parametrize"
                and w.kind in PARAMETRIZE_KINDS
                and not lora
                and isinstance(t, nn.Parameter)
                and t.requires_grad
                and mod is not module
                and not P.is_parametrized(mod, attr)
            ):
                parametrize_(mod, attr, w.dim)
                registered.append((mod, attr))
                state.parametrized.append(w)
            else:
                state.projected.append(w)
        if check:
            got = run(module, args, kwargs)
            state.max_error = max_relative_error(ref, got)
            limit = tol if tol is not None else tolerance(ref)
            if not state.max_error <= limit:
                raise FoldingError(
                    f"the converted {type(module).__name__} differs from the original by {state.max_error:.3g} "
                    f"(relative to the output RMS; tolerance {limit:.3g}). This is a bug in the analysis: please "
                    "report it with the model; convert(check=False) skips the check at your own risk."
                )
    except Exception:
        for mod, attr in reversed(registered):
            if is_centered_parametrization(mod, attr):
                P.remove_parametrizations(mod, attr, leave_parametrized=False)
        undo.rollback()
        raise
    object.__setattr__(module, MARKER, state)
    if not any(
        getattr(h, "__name__", "") == "_recenter_after_load"
        for h in module._load_state_dict_post_hooks.values()
    ):
        module.register_load_state_dict_post_hook(_recenter_after_load)
    log.info("%s", state.summary())
    return plan


def unparametrize(module: nn.Module) -> int:
    """Replace the Centering parametrizations under ``module`` by plain centered parameters (same Parameter
    objects); the affected writers are then kept centered by projection.  Returns how many were removed."""
    n = 0
    for _, mod, state in converted_modules(module):
        n += unparametrize_(mod)
        state.projected.extend(state.parametrized)
        state.parametrized = []
    return n
