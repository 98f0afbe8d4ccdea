"""convert(): make a LayerNorm model train as a CBWC + RMSNorm model, in place, with the same function.

    plan = lightning_cbwc.convert(model, (x,))            # analysis, exact centering, LayerNorm -> RMSNorm
    handle = lightning_cbwc.attach(optimizer, model)      # keep the writers centered after every step

Once per module (it then carries a :class:`~lightning_cbwc.training.state.CBWCState`): capture and analyze,
center every writer exactly, fold LayerScales into their writers (then frozen at 1), swap each foldable
LayerNorm for an RMSNorm that adopts the LayerNorm's own Parameters, and choose how each writer stays
centered: ``mode="project"`` (re-centered after each optimizer step, :mod:`.projection`) or
``mode="parametrize"`` (W = V - mean_out(V), :mod:`.parametrize`; embeddings, stream parameters, frozen writers
and LoRA matrices are projected even then).  State dicts keep plain keys; a load post-hook re-centers
writers that arrive uncentered.  docs/architecture.md says why; BENCHMARKS.md what each mode costs.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize as P

from ..analysis import FoldPlan, analyze_captured, capture
from ..centering import center_, fold_scale_, max_column_mean
from ..errors import UnsupportedError
from ..inputs import split_inputs
from ..surgery import Undo, center_writers, swap_norms
from ..verify import Reference, check_equivalent
from .lora import check_peft
from .parametrize import is_centered_parametrization, parametrize_
from .state import MARKER, MODES, CBWCState, converted_modules, converted_state, owner, stored

log = logging.getLogger("lightning_cbwc")

#: writer kinds that mode="parametrize" parametrizes (the others are projected)
PARAMETRIZE_KINDS = ("linear", "conv1d", "conv")


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
            g = stored(module, name)
        except AttributeError:
            continue
        if not bool((g == 1).all()):
            refold.append((name, g))
    for name, g in refold:
        for w in state.writers:
            if w.scale == name:
                fold_scale_(stored(module, w.param), g, w.dim)
        g.fill_(1)
    fixed = 0
    for w in state.projected:
        try:
            t = stored(module, w.param)
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


def check_supported(module: nn.Module) -> None:
    """Raise UnsupportedError for parameter layouts where column projection is wrong or impossible."""
    check_peft(module)
    if not torch.distributed.is_available():  # no sharded parameters without torch.distributed
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    from torch.distributed.tensor import DTensor

    for name, mod in module.named_modules():
        if isinstance(mod, FSDP1):
            raise UnsupportedError(
                f"{name or type(module).__name__} is wrapped by FSDP1: its flat parameters make per-column "
                "centering wrong. Convert before wrapping with DDP, or use strategy='ddp'."
            )
    for name, p in module.named_parameters():
        if isinstance(p, DTensor):
            raise UnsupportedError(
                f"{name} is a DTensor (FSDP2 / tensor parallel): CBWC projection of sharded parameters is not "
                "supported yet. Convert the model before sharding it is not enough either; use strategy='ddp'."
            )
        if type(p).__name__ == "FlatParameter":
            raise UnsupportedError(f"{name} is an FSDP1 FlatParameter: CBWC is not supported with FSDP1")


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
    :class:`~lightning_cbwc.FoldCheckError` (a FoldingError) is raised.

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
    args, kwargs = split_inputs(example_inputs, example_kwargs)
    reference = Reference.of(module, args, kwargs) if check else None
    plan = analyze_captured(capture(module, args, kwargs))
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
    with Undo().on_error() as undo:
        center_writers(module, plan, undo)
        swap_norms(module, plan, undo)
        state.norms = [s.name for s in plan.foldable]
        state.frozen_scales = _freeze_scales(module, plan, undo)
        _keep_centered(module, state, undo)
        if check:
            state.max_error = check_equivalent(module, reference, args, kwargs, action="convert", tol=tol)
    object.__setattr__(module, MARKER, state)
    if not any(
        getattr(h, "__name__", "") == "_recenter_after_load"
        for h in module._load_state_dict_post_hooks.values()
    ):
        module.register_load_state_dict_post_hook(_recenter_after_load)
    log.info("%s", state.summary())
    return plan


def _freeze_scales(module: nn.Module, plan: FoldPlan, undo: Undo) -> list[str]:
    """Freeze the LayerScales folded into their writers (they are 1 now; training them would de-center)."""
    scales = sorted({w.scale for w in plan.writers if w.scale})
    for name in scales:
        g = stored(module, name)
        if g.requires_grad:
            undo.call(lambda g=g: g.requires_grad_(True))
            g.requires_grad_(False)
    return scales


def _keep_centered(module: nn.Module, state: CBWCState, undo: Undo) -> None:
    """Sort the writers into parametrized (mode="parametrize": trainable Linear / Conv / Conv1D weights of
    submodules) and projected (everything else), registering the parametrizations."""
    for w in state.plan.writers:
        if w.kind == "embedding_lookup":
            continue
        mod, attr = owner(module, w.param)
        t = mod._parameters.get(attr)
        if (
            state.mode == "parametrize"
            and w.kind in PARAMETRIZE_KINDS
            and "lora_" not in w.param
            and isinstance(t, nn.Parameter)
            and t.requires_grad
            and mod is not module
            and not P.is_parametrized(mod, attr)
        ):
            parametrize_(mod, attr, w.dim)
            undo.call(lambda mod=mod, attr=attr: _remove_centering(mod, attr))
            state.parametrized.append(w)
        else:
            state.projected.append(w)


def _remove_centering(mod: nn.Module, attr: str) -> None:
    if is_centered_parametrization(mod, attr):
        P.remove_parametrizations(mod, attr, leave_parametrized=False)
