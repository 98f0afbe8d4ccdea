"""Compare a folded model's outputs with the original's, with tolerances that follow the dtype."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .errors import FoldCheckError

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
    ref32 = run(copy.deepcopy(model).float(), upcast(args), upcast(kwargs))
    return max_relative_error(ref32, out)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode inside the block; afterwards every module has its own train/eval flag back
    (``model.train(was)`` would reset them all to the root's)."""
    with _mode(model, False):
        yield model


@contextlib.contextmanager
def train_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in train mode (every module) inside the block; every module's own flag back afterwards."""
    with _mode(model, True):
        yield model


@contextlib.contextmanager
def _mode(model: torch.nn.Module, training: bool) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@torch.no_grad()
def run(model: torch.nn.Module, args: tuple, kwargs: dict | None) -> Any:
    """Call ``model`` in eval mode without grad, restoring every module's train/eval flag.

    On copies of the input tensors: a model that writes to its inputs in place (``x += 1``) neither changes
    the caller's example nor sees different inputs on each check."""
    args, kwargs = pytree.tree_map_only(torch.Tensor, torch.clone, (args, kwargs or {}))
    with eval_mode(model):
        return model(*args, **kwargs)


@dataclass
class Reference:
    """The original model's outputs on the example inputs, and (bf16/fp16) its own rounding noise."""

    outputs: Any
    noise: float = 0.0

    @classmethod
    def of(cls, model: torch.nn.Module, args: tuple, kwargs: dict | None) -> Reference:
        out = run(model, args, kwargs)
        # bf16/fp16: the original is itself only so close to its float32 self; allow the change the same slack
        noise = rounding_baseline(model, args, kwargs, out) if is_low_precision(out) else 0.0
        return cls(out, noise)

    def limit(self, tol: float | None = None) -> float:
        return tol if tol is not None else max(tolerance(self.outputs), 3 * self.noise)


def check_equivalent(
    changed: torch.nn.Module,
    reference: Reference,
    args: tuple,
    kwargs: dict | None,
    *,
    action: str,
    tol: float | None = None,
) -> float:
    """The max relative output error of ``changed`` against ``reference``; raises FoldCheckError beyond the
    tolerance.  ``action`` names what changed the model (``"fold"``, ``"convert"``) for the message."""
    error = max_relative_error(reference.outputs, run(changed, args, kwargs))
    limit = reference.limit(tol)
    if not error <= limit:
        done = {"fold": "folded", "convert": "converted"}.get(action, f"{action}ed")
        raise FoldCheckError(
            error,
            limit,
            f"the {done} {type(changed).__name__} differs from the original by {error:.3g} (relative to the "
            f"output RMS; tolerance {limit:.3g}). This is a bug in the analysis: please report it with the "
            f"model; {action}(check=False) skips the check at your own risk.",
        )
    return error
