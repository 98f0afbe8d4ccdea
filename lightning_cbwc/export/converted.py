"""The inference form of a model converted for training: an un-parametrized copy with the sites kept as
LayerNorm for training only (dropout) folded too.  Used by :func:`~lightning_cbwc.export.export` and
:func:`~lightning_cbwc.export.trained.export_trained`."""

from __future__ import annotations

import copy
import dataclasses

from torch import nn

from ..analysis import FoldPlan
from ..surgery import Undo, center_writers, swap_norms
from ..training.state import MARKER, converted_modules, unparametrize
from ..verify import Reference, check_equivalent


def _unparametrized_copy(module: nn.Module) -> nn.Module:
    """A deep copy of a converted module without parametrizations (centered plain weights); a LightningModule's
    trainer is shared, not copied."""

    trainer = module.__dict__.get("_trainer")
    memo = {id(trainer): trainer} if trainer is not None else {}
    dup = copy.deepcopy(module, memo)
    unparametrize(dup)
    return dup


def _fold_inference_only_(dup: nn.Module, example: tuple[tuple, dict] | None) -> None:
    """Fold, in the export copy, the sites kept as LayerNorm for training only (dropout reaches them) with the
    eval-mode plan of the conversion; checked on the example inputs when given.  The copy's plan lists both."""
    for _, mod, state in converted_modules(dup):
        names = set(state.inference_only)
        if not names:
            continue
        extra = FoldPlan(sites=[s for s in state.inference_plan.sites if s.name in names])
        reference = Reference.of(mod, *example) if example is not None and mod is dup else None
        with Undo().on_error() as undo:
            center_writers(mod, extra, undo)
            swap_norms(mod, extra, undo)
            if reference is not None:
                check_equivalent(mod, reference, *example, action="fold")
        sites = [extra[s.name] if s.name in names else s for s in state.plan.sites]
        plan = dataclasses.replace(state.plan, sites=sites)
        norms = [*state.norms, *sorted(names)]
        object.__setattr__(
            mod, MARKER, dataclasses.replace(state, plan=plan, inference_plan=None, norms=norms)
        )


def inference_copy(module: nn.Module, example: tuple[tuple, dict] | None = None) -> nn.Module:
    """A copy of the converted ``module`` in inference form: centered plain weights, every norm that folds
    for inference swapped (checked on ``example`` when given); ``module`` itself is left as it is."""
    dup = _unparametrized_copy(module)
    _fold_inference_only_(dup, example)
    return dup
