"""convert(): make a LayerNorm model train as a CBWC + RMSNorm model, in place, with the same function.

    plan = lightning_cbwc.convert(model, (x,))            # analysis, centering, LayerNorm -> RMSNorm
    handle = lightning_cbwc.attach(optimizer, model)      # keep the writers centered across steps

Once per module (it then carries a :class:`~lightning_cbwc.training.state.CBWCState`): capture and analyze
in eval mode and in train mode (a site that dropout reaches is exact at inference only: it stays LayerNorm
for training and is folded at export), then keep every writer centered: ``mode="parametrize"`` (the
default: W = V - mean_out(V) over the LayerNorm model's own, uncentered weights V, :mod:`.parametrize`;
exact for every optimizer) or ``mode="project"`` (writers centered now and re-centered after each optimizer
step, :mod:`.projection`); trainable tables are centered at the lookup in both.  A writer followed by a
LayerScale g is always parametrized, scaled (W = V - mean(g V) / g), so g keeps training as in the LayerNorm
model.  Each LayerNorm then becomes an RMSNorm that adopts its Parameters.  State dicts keep plain keys; a
load post-hook re-centers projected writers that arrive uncentered.  README has the table of what is exact
in which mode.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize as P

from ..analysis import Captured, FoldPlan, Writer, analyze_captured, capture, trains_with_own_flags
from ..analysis.passes import REPLACE
from ..centering import center_, is_uncentered
from ..errors import FoldCheckError, UnsupportedError
from ..inputs import split_inputs
from ..surgery import Undo, center_lookups, swap_norms
from ..verify import Reference, check_equivalent, max_relative_error, run
from .lora import check_peft
from .monitor import layer_norm_gap
from .parametrize import (
    Centering,
    ScaledCentering,
    center_output_when_cheaper_,
    is_centered_parametrization,
    parametrize_,
    remove_output_centering,
)
from .state import MARKER, MODES, CBWCState, converted_modules, converted_state, owner, stored

log = logging.getLogger("lightning_cbwc")

#: writer kinds that mode="parametrize" parametrizes (the others are projected)
PARAMETRIZE_KINDS = ("linear", "conv1d", "conv", "parameter")


@torch.no_grad()
def _recenter_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    """Load post-hook: re-center projected writers that came back uncentered (a vanilla LayerNorm
    checkpoint); centered ones are left bit-identical (exact resume), parametrized ones hold V as it is."""
    state = converted_state(module)
    if state is None:
        return
    fixed = 0
    for w in state.projected:
        try:
            t = stored(module, w.param)
            scale = stored(module, w.scale) if w.scale else None  # a LayerScale writer, unparametrized
        except AttributeError:
            continue
        if is_uncentered(t, w.dim, scale):
            center_(t, w.dim, scale)
            fixed += 1
    if fixed:
        log.info("CBWC: re-centered %d writers after load_state_dict", fixed)


def _meta_init(module: nn.Module, mode: str, check: bool) -> bool:
    """A model on the meta device (built for FSDP2's deferred init): only ``mode="project"`` survives its
    materialization, and there is nothing to compute a check on.  Returns the ``check`` to use."""
    if mode == "parametrize":
        raise UnsupportedError(
            f"{type(module).__name__} is on the meta device: mode='parametrize' cannot survive its "
            "materialization (reset_parameters() would initialize the computed centered weight, not the trained "
            "V). Use mode='project': attach() (and the CBWC callback) re-center the materialized writers "
            "before the first step."
        )
    if check:
        log.info("CBWC: %s is on the meta device: conversion check skipped", type(module).__name__)
    return False


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
                f"{name} is already a DTensor (sharded by FSDP2 / tensor parallel): convert the model before "
                "sharding it (lightning_cbwc.convert(model, example) then fully_shard; with Lightning, build the "
                "network in __init__ so the CBWC callback converts it at setup, or call convert in "
                "configure_model before fully_shard). Projection and gradient centering then work on the shards."
            )
        if type(p).__name__ == "FlatParameter":
            raise UnsupportedError(f"{name} is an FSDP1 FlatParameter: CBWC is not supported with FSDP1")


def convert(
    module: nn.Module,
    example_inputs: Any,
    example_kwargs: dict[str, Any] | None = None,
    *,
    mode: str = "parametrize",
    replace: str = "foldable",
    check: bool = True,
    tol: float | None = None,
) -> FoldPlan:
    """Convert ``module`` in place for CBWC training and return the :class:`~lightning_cbwc.FoldPlan`.

    ``example_inputs`` (a tuple of positional args, or one tensor) and ``example_kwargs``: what ``module`` is
    called with (it is captured with ``torch.export`` in eval and in train mode).  ``mode``: ``"parametrize"``
    or ``"project"`` (see the module docstring).  With ``check`` the outputs on the example inputs are compared
    with the unconverted model's; beyond a dtype-aware tolerance (or ``tol``) the conversion is rolled back and
    :class:`~lightning_cbwc.FoldCheckError` (a FoldingError) is raised.

    ``replace="all"`` (for training from scratch; the default ``"foldable"`` keeps the function): every
    swappable LayerNorm becomes RMSNorm.  Sites whose input is zero-mean once their writers are centered are
    ``exact`` even where centering changes something else (a tied head, the output: the model then trains
    under the constraint); the others are ``approximate``, with the reason.  The check then only asks the exact
    sites to compute LayerNorm's function, and measures the output change on the example inputs
    (``CBWCState.step0_change``; for a trained checkpoint, how much the conversion moved it).

    Idempotent: a converted module carries ``_cbwc_converted`` (a :class:`CBWCState`); converting it again,
    or converting a parent of a converted module, returns the existing plan and changes nothing.  With no
    foldable LayerNorm it warns and changes nothing (the marker is still set, so the analysis is not redone).
    Raises :class:`~lightning_cbwc.CaptureError` (with a hint) when the model cannot be captured and
    :class:`~lightning_cbwc.UnsupportedError` for FSDP / DTensor parameters, DoRA and base-modifying LoRA inits.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if replace not in REPLACE:
        raise ValueError(f"replace must be one of {REPLACE}, got {replace!r}")
    state = converted_state(module)
    if state is not None:
        _warn_if_settings_differ(module, state, mode=mode, replace=replace)
        return state.plan
    inner = converted_modules(module)
    if inner:
        name, _, state = inner[0]
        log.info("CBWC: %s is already converted; not converting %s again", name, type(module).__name__)
        return state.plan
    check_supported(module)
    if any(p.is_meta for p in module.parameters()):
        check = _meta_init(module, mode, check)
    args, kwargs = split_inputs(example_inputs, example_kwargs)
    reference = Reference.of(module, args, kwargs) if check else None
    captured = capture(module, args, kwargs)
    plan, inference_plan = training_plan(module, captured, args, kwargs, replace)
    state = CBWCState(plan=plan, mode=mode, inference_plan=inference_plan, replace=replace)
    if not plan.swapped:
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
        center_lookups(module, plan, undo, zero_mean_grad=state.zero_mean_grads)
        _keep_centered(module, state, undo)
        swapped = swap_norms(module, plan, undo)
        state.norms = [s.name for s in plan.swapped]
        if check:
            _check(module, state, [swapped[s.name] for s in plan.foldable], reference, args, kwargs, tol)
    object.__setattr__(module, MARKER, state)
    if trains_with_own_flags(module):  # the train-mode analysis took the dropouts' flags as they are
        _guard_inactive_dropout(module)
    if not any(
        getattr(h, "__name__", "") == "_recenter_after_load"
        for h in module._load_state_dict_post_hooks.values()
    ):
        module.register_load_state_dict_post_hook(_recenter_after_load)
    log.info("%s", state.summary())
    return plan


def _warn_if_settings_differ(module: nn.Module, state: CBWCState, **settings: str) -> None:
    for key, value in settings.items():
        if getattr(state, key) != value:
            warnings.warn(
                f"{type(module).__name__} was already converted with {key}={getattr(state, key)!r}; ignoring "
                f"{key}={value!r}",
                stacklevel=3,
            )


INFERENCE_ONLY = "exact at inference only (folded at export); kept as LayerNorm for training"
TRAINING_ONLY_APPROXIMATE = "exact at inference only; approximate in training (its writers stay centered)"


def training_plan(
    module: nn.Module, captured: Captured, args: tuple, kwargs: dict, replace: str = "foldable"
) -> tuple[FoldPlan, FoldPlan | None]:
    """The eval-mode plan less the sites that would not train exactly and, when some of those are exact at
    inference only (dropout reaches them in train mode), the full eval-mode plan (export folds them with it).
    ``replace="all"``: those sites are swapped too, as approximate, with their writers centered.
    Trainable tables are centered at the lookup in both modes (the table stays the LayerNorm model's): a pass
    over the looked-up rows, not a re-centering of the whole table after every step."""
    plan = full = analyze_captured(captured, replace=replace)
    trained = None
    if plan.foldable:
        trained = analyze_captured(capture(module, args, kwargs, training=True), replace=replace)
    keep: dict[str, str] = {}
    while True:
        for site in plan.foldable:
            cause = _train_reason(trained, site.name) if replace == "foldable" else None
            why = f"{INFERENCE_ONLY}: {cause}" if cause else _layer_scale_reason(module, site.writers)
            if why:
                keep[site.name] = why
        if not any(s.name in keep for s in plan.foldable):
            break
        plan = analyze_captured(captured, keep, replace)
    if replace == "all":
        plan = _approximate_in_training(plan, trained)
    plan = _tables_at_lookup(module, plan)
    inference_only = any(why.startswith(INFERENCE_ONLY) for why in keep.values())
    return plan, full if inference_only else None


def _train_reason(trained: FoldPlan | None, name: str) -> str | None:
    """Why the train-mode graph cannot fold site ``name`` (it can in eval mode), or None."""
    if trained is None:
        return None
    try:
        site = trained[name]
    except KeyError:
        return "the train-mode graph does not run it"
    return None if site.foldable else site.reason


def _approximate_in_training(plan: FoldPlan, trained: FoldPlan | None) -> FoldPlan:
    """``replace="all"``: the sites exact in eval mode only, marked approximate (their writers kept)."""
    sites = []
    for site in plan.sites:
        cause = _train_reason(trained, site.name) if site.foldable else None
        if cause:
            why = f"{TRAINING_ONLY_APPROXIMATE}: {cause}"
            site = dataclasses.replace(site, foldable=False, approximate=True, reason=why)
        sites.append(site)
    return dataclasses.replace(plan, sites=sites)


def _check(
    module: nn.Module,
    state: CBWCState,
    exact: list[nn.Module],
    reference: Reference,
    args: tuple,
    kwargs: dict,
    tol: float | None,
) -> None:
    """The conversion check: the outputs are the original's; with ``replace="all"``, each exact site's RMSNorm
    computes LayerNorm's function on its own input, and the change of the outputs is measured, not bounded."""
    if state.replace != "all":
        state.max_error = check_equivalent(module, reference, args, kwargs, action="convert", tol=tol)
        return
    error = layer_norm_gap(module, exact, args, kwargs)
    limit = reference.limit(tol)
    if not error <= limit:
        raise FoldCheckError(
            error,
            limit,
            f"an exact site of the converted {type(module).__name__} differs from LayerNorm on its own input by "
            f"{error:.3g} (tolerance {limit:.3g}). This is a bug in the analysis: please report it with the "
            "model; convert(check=False) skips the check at your own risk.",
        )
    state.max_error = error
    state.step0_change = max_relative_error(reference.outputs, run(module, args, kwargs))


def _parametrizable(module: nn.Module, w: Writer) -> bool:
    """True for a Linear / Conv / Conv1D / stream Parameter without another parametrization."""
    mod, attr = owner(module, w.param)
    return (
        w.kind in PARAMETRIZE_KINDS
        and "lora_" not in w.param
        and isinstance(mod._parameters.get(attr), nn.Parameter)
        and not P.is_parametrized(mod, attr)
    )


def _layer_scale_reason(module: nn.Module, writers: list[Writer]) -> str | None:
    """Why a writer's LayerScale cannot keep training exactly (scaled centering impossible), or None."""
    for w in writers:
        if not w.scale:
            continue
        if not _parametrizable(module, w):
            return (
                f"the LayerScale {w.scale} follows {w.param}, which cannot carry the scaled centering that keeps "
                "the LayerScale trainable; kept as LayerNorm (fold() folds it for inference)"
            )
        if not bool((stored(module, w.scale) != 0).all()):
            return f"the LayerScale {w.scale} has zeros: its writer {w.param} cannot be centered scaled"
    return None


def _tables_at_lookup(module: nn.Module, plan: FoldPlan) -> FoldPlan:
    """The plan with each trainable nn.Embedding table writer centered at the lookup instead."""
    names = set()
    for w in plan.writers:
        if w.kind == "embedding":
            mod = module.get_submodule(w.module) if w.module else module
            if type(mod) is nn.Embedding and mod.weight.requires_grad:
                names.add(w.param)
    if not names:
        return plan

    def moved(w: Writer) -> Writer:
        return dataclasses.replace(w, kind="embedding_lookup") if w.param in names else w

    sites = [dataclasses.replace(s, writers=[moved(w) for w in s.writers]) for s in plan.sites]
    return dataclasses.replace(plan, sites=sites)


def _keep_centered(module: nn.Module, state: CBWCState, undo: Undo) -> None:
    """Make every writer centered: parametrized (mode="parametrize": trainable Linear / Conv / Conv1D weights
    of submodules, uncentered; LayerScale writers in both modes, scaled) or centered now and projected."""
    for w in state.plan.writers:
        if w.kind == "embedding_lookup":
            continue  # a CenteredEmbedding centers the rows it looks up
        mod, attr = owner(module, w.param)
        t = mod._parameters.get(attr)
        if w.scale:
            scale_owner, scale_attr = owner(module, w.scale)
            centering = ScaledCentering(w.dim, scale_owner, scale_attr)
        elif state.mode == "parametrize" and _parametrizable(module, w) and t.requires_grad:
            centering = Centering(w.dim, zero_mean_grad=state.zero_mean_grads)
        else:
            t = stored(module, w.param)
            undo.tensor(t)
            center_(t, w.dim)
            state.projected.append(w)
            continue
        parametrize_(mod, attr, w.dim, centering)
        undo.call(lambda mod=mod, attr=attr: _remove_centering(mod, attr))
        state.parametrized.append(w)
    for w in state.parametrized:
        center_output_when_cheaper_(owner(module, w.param)[0])


def _warn_if_dropout_turns_on(dropout: nn.Module, args: tuple) -> None:
    """Forward pre-hook on a dropout that was inactive at conversion: warn once if it now trains."""
    if dropout.training and not dropout.__dict__.get("_cbwc_warned"):
        dropout.__dict__["_cbwc_warned"] = True
        warnings.warn(
            f"CBWC: a {type(dropout).__name__}(p={dropout.p}) that was in eval mode at conversion now runs in "
            "training mode: the RMSNorms it reaches no longer compute LayerNorm's function. Convert with the "
            "modules in the mode they train in (e.g. model.train() first).",
            stacklevel=2,
        )


def _guard_inactive_dropout(module: nn.Module) -> None:
    """The analysis assumed the dropouts in eval mode stay inactive: register a warning if one turns on."""
    for mod in module.modules():
        if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0 and not mod.training:
            if not any(h is _warn_if_dropout_turns_on for h in mod._forward_pre_hooks.values()):
                mod.register_forward_pre_hook(_warn_if_dropout_turns_on)


def _remove_centering(mod: nn.Module, attr: str) -> None:
    remove_output_centering(mod)
    if is_centered_parametrization(mod, attr):
        P.remove_parametrizations(mod, attr, leave_parametrized=False)
