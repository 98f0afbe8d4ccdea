"""What convert() did to a module: the marker it leaves (:class:`CBWCState`) and lookups through it.

A converted module carries ``_cbwc_converted`` (a :class:`CBWCState`); the functions here find converted
modules and the tensors behind a writer's name (through a parametrization or a peft ``base_layer``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize as P

from ..analysis import FoldPlan, Writer
from .parametrize import original, unparametrize_

MARKER = "_cbwc_converted"
MODES = ("project", "parametrize")


@dataclass
class CBWCState:
    """What :func:`convert` did to a module; stored on it as ``module._cbwc_converted``.

    ``parametrized``: writers kept centered by a parametrization (mode="parametrize", and LayerScale writers
    in both modes).  ``projected``: writers centered at conversion and re-centered by :func:`project_`
    (the others: stream parameters, frozen writers, and in project mode everything without a LayerScale).
    ``inference_plan``: the eval-mode plan, kept when some sites stay LayerNorm for training only (dropout
    reaches them; :attr:`inference_only`), to fold them at export.  ``norms``: the swapped norm modules.
    ``max_error``: the conversion check's max relative error (with ``replace="all"``: of the exact sites'
    RMSNorms against LayerNorm on their inputs).  ``step0_change``: with ``replace="all"``, how far the
    converted model's outputs are from the LayerNorm model's on the example inputs (relative to their RMS).
    """

    plan: FoldPlan
    mode: str
    parametrized: list[Writer] = field(default_factory=list)
    projected: list[Writer] = field(default_factory=list)
    inference_plan: FoldPlan | None = None
    norms: list[str] = field(default_factory=list)
    max_error: float | None = None
    replace: str = "foldable"
    step0_change: float | None = None

    @property
    def writers(self) -> list[Writer]:
        return self.plan.writers

    @property
    def zero_mean_grads(self) -> bool:
        """Whether the writers' gradients are zero-mean by construction, so that no gradient projection is
        needed: every swapped norm is exact (and computes LayerNorm's backward), and nothing else sees a
        writer's shift.  Not with ``replace="all"``, whose exact sites may feed a tied head or the output."""
        return self.replace == "foldable"

    @property
    def layer_scales(self) -> list[str]:
        """The LayerScale parameters whose writers are centered scaled (they keep training)."""
        return sorted({w.scale for w in self.plan.writers if w.scale})

    @property
    def inference_only(self) -> list[str]:
        """Sites kept as LayerNorm for training that fold for inference (dropout reaches them in training)."""
        if self.inference_plan is None:
            return []
        return [s.name for s in self.inference_plan.foldable if not self.plan[s.name].foldable]

    def summary(self) -> str:
        plan = self.plan
        return (
            f"CBWC ({self.mode}{', replace=all' if self.replace == 'all' else ''}): {plan.summary()}; {len(self.parametrized)} writers parametrized, "
            f"{len(self.projected)} projected"
            + (f", {len(self.layer_scales)} LayerScales kept trainable" if self.layer_scales else "")
            + (f", {len(self.inference_only)} exact at inference only" if self.inference_only else "")
            + (
                f"; outputs changed by {self.step0_change:.3g} (relative to their RMS) on the example inputs"
                if self.step0_change is not None
                else ""
            )
        )


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


def stored(root: nn.Module, qualname: str) -> torch.Tensor:
    """The stored tensor (parametrization original, parameter or buffer) behind ``qualname``."""
    mod, attr = owner(root, qualname)
    try:
        return original(mod, attr)
    except AttributeError:
        raise AttributeError(f"{qualname}: no such parameter or buffer under {type(root).__name__}") from None


def effective(root: nn.Module, qualname: str) -> torch.Tensor:
    """The tensor the forward uses (the centered value for a parametrized writer)."""
    mod, attr = owner(root, qualname)
    return getattr(mod, attr)


def unparametrize(module: nn.Module) -> int:
    """Replace the Centering parametrizations under ``module`` by plain centered parameters (same Parameter
    objects); the affected writers are then kept centered by projection (for export and inference: a
    LayerScale writer trained that way is no longer exact).  Returns how many were removed."""
    n = 0
    for _, mod, state in converted_modules(module):
        n += unparametrize_(mod)
        state.projected.extend(state.parametrized)
        state.parametrized = []
    return n
