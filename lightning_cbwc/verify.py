"""Compare a folded model's outputs with the original's, with tolerances that follow the dtype."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

#: allowed max |folded - original| / RMS(original), per output dtype
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (tensor, tuple, dict, HF ModelOutput...)."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    leaves = pytree.tree_leaves(out)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def relative_error(ref: torch.Tensor, got: torch.Tensor) -> float:
    """max |got - ref| / RMS(ref), in float64."""
    r, g = ref.detach().to(torch.float64), got.detach().to(torch.float64)
    if r.numel() == 0:
        return 0.0
    rms = r.pow(2).mean().sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    return float((g - r).abs().max() / rms)


def max_relative_error(ref_out: Any, got_out: Any) -> float:
    """The largest :func:`relative_error` over all floating outputs (they must line up)."""
    refs, gots = output_tensors(ref_out), output_tensors(got_out)
    if len(refs) != len(gots):
        raise ValueError(f"the outputs differ in structure: {len(refs)} tensors vs {len(gots)}")
    return max((relative_error(r, g) for r, g in zip(refs, gots, strict=True)), default=0.0)


def tolerance(out: Any) -> float:
    """The tolerance for the loosest dtype among the outputs."""
    dtypes = {t.dtype for t in output_tensors(out)}
    return max((TOLERANCE.get(d, 1e-4) for d in dtypes), default=1e-4)


LOW_PRECISION = (torch.bfloat16, torch.float16)


def is_low_precision(out: Any) -> bool:
    return any(t.dtype in LOW_PRECISION for t in output_tensors(out))


def upcast(tree: Any) -> Any:
    """bf16/fp16 tensors of a nested structure cast to float32 (other leaves unchanged)."""
    return pytree.tree_map(
        lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype in LOW_PRECISION else t, tree
    )


def rounding_baseline(model: torch.nn.Module, args: tuple, kwargs: dict | None, out: Any) -> float:
    """How far a low-precision model already is from its own float32 copy: the noise floor of a check."""
    import copy

    ref32 = run(copy.deepcopy(model).float(), upcast(args), upcast(kwargs))
    return max_relative_error(ref32, out)


@torch.no_grad()
def run(model: torch.nn.Module, args: tuple, kwargs: dict | None) -> Any:
    """Call ``model`` in eval mode without grad, restoring its training flag."""
    was = model.training
    model.eval()
    try:
        return model(*args, **(kwargs or {}))
    finally:
        model.train(was)
