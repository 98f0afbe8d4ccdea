"""fold(): turn a trained LayerNorm model into an RMSNorm model with the same outputs.

capture -> analyze -> center the writers (float64, cast back) -> swap each foldable LayerNorm for an
RMSNorm with the same gamma, beta and eps -> optionally fuse gamma/beta into the linears the norm feeds
-> check the outputs against the original.  Each step is a function of :mod:`lightning_cbwc.surgery`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any

from torch import nn

from .analysis import analyze_captured, capture
from .inputs import split_inputs
from .surgery import Undo, center_writers, fuse_affine_, swap_norms
from .verify import Reference, check_equivalent

log = logging.getLogger("lightning_cbwc")


def fold(
    model: nn.Module,
    example_inputs: Any,
    example_kwargs: dict[str, Any] | None = None,
    *,
    fuse_affine: bool = False,
    inplace: bool = False,
    check: bool = True,
    tol: float | None = None,
) -> nn.Module:
    """An RMSNorm model with the same outputs as ``model``: foldable LayerNorms swapped, writers centered.

    Works on a deep copy unless ``inplace``.  With ``check`` the outputs on the example inputs are compared
    with the original's; beyond a dtype-aware tolerance (or ``tol``) it raises FoldCheckError (a FoldingError)
    and an in-place fold is rolled back.  The result carries ``cbwc_plan`` and, when checked, ``cbwc_max_error``.
    """
    args, kwargs = split_inputs(example_inputs, example_kwargs)
    reference = Reference.of(model, args, kwargs) if check else None
    target = model if inplace else copy.deepcopy(model)
    cap = capture(target, args, kwargs)
    plan = analyze_captured(cap)
    if not plan.foldable:
        log.warning("nothing to fold in %s: %s", type(model).__name__, plan.summary())
    undo = Undo()
    with undo.on_error() if inplace else contextlib.nullcontext():
        center_writers(target, plan, undo)
        swap_norms(target, plan, undo)
        fused = fuse_affine_(target, plan, cap.graph, cap.placeholders, undo) if fuse_affine else []
        error = check_equivalent(target, reference, args, kwargs, action="fold", tol=tol) if check else None
    target.cbwc_plan = plan
    target.cbwc_fused = fused
    target.cbwc_max_error = error
    return target
