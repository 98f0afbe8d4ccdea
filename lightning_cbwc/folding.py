"""fold(): turn a trained LayerNorm model into an RMSNorm model with the same outputs.

capture -> analyze -> center the writers (float64, cast back) -> swap each foldable LayerNorm for an
RMSNorm with the same gamma, beta and eps -> optionally fuse gamma/beta into the linears the norm feeds
-> check the outputs against the original.  Each step is a function of :mod:`lightning_cbwc.surgery`.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from torch import nn

from .analysis import analyze_captured, capture
from .errors import FoldCheckError
from .surgery import Undo, center_writers, fuse_affine_, swap_norms
from .verify import is_low_precision, max_relative_error, rounding_baseline, run, tolerance

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
    with the original's; beyond a dtype-aware tolerance (or ``tol``) it raises FoldingError and an in-place
    fold is rolled back.  The result carries ``cbwc_plan`` and, when checked, ``cbwc_max_error``.
    """
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    ref = run(model, example_inputs, example_kwargs) if check else None
    # bf16/fp16: the original is itself only so close to its float32 self; allow the fold the same slack
    noise = (
        rounding_baseline(model, example_inputs, example_kwargs, ref)
        if check and is_low_precision(ref)
        else 0.0
    )
    target = model if inplace else copy.deepcopy(model)
    cap = capture(target, example_inputs, example_kwargs)
    plan = analyze_captured(cap)
    undo = Undo()
    try:
        if not plan.foldable:
            log.warning("nothing to fold in %s: %s", type(model).__name__, plan.summary())
        center_writers(target, plan, undo)
        swap_norms(target, plan, undo)
        fused = fuse_affine_(target, plan, cap.graph, cap.placeholders, undo) if fuse_affine else []
        error = None
        if check:
            got = run(target, example_inputs, example_kwargs)
            error = max_relative_error(ref, got)
            limit = tol if tol is not None else max(tolerance(ref), 3 * noise)
            if not error <= limit:
                raise FoldCheckError(
                    error,
                    limit,
                    f"the folded {type(model).__name__} differs from the original by {error:.3g} (relative to the "
                    f"output RMS; tolerance {limit:.3g}). This is a bug in the analysis: please report it with "
                    "the model; fold(check=False) skips the check at your own risk.",
                )
    except Exception:
        if inplace:
            undo.rollback()
        raise
    target.cbwc_plan = plan
    target.cbwc_fused = fused
    target.cbwc_max_error = error
    return target
