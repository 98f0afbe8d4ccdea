"""Helpers the tests import (``from helpers import ...``); fixtures live in ``conftest.py``.

* :func:`randomize_norm_affine` gives LayerNorms a non-trivial gamma/beta (random-init models have gamma=1,
  beta=0, which would hide a fold that mishandles the affine); :func:`randomize_biases` does the same for
  the zero-initialized biases of linears and convs.
* :func:`assert_equivalent` compares a folded model with its original on *fresh* random inputs (not the
  example inputs the fold was checked on).
* :func:`assert_fold_oracle` is the oracle every "foldable" verdict must pass: on fresh inputs (other batch and
  sequence sizes than the example), each folded site's input is zero-mean and every output is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_cbwc.inputs import split_inputs
from lightning_cbwc.verify import max_relative_error, output_tensors, run

SEED = 1234


def _is_layer_norm(module: nn.Module) -> bool:
    # nn.LayerNorm and its subclasses (timm's LayerNorm / LayerNorm2d)
    return isinstance(module, nn.LayerNorm)


@torch.no_grad()
def randomize_norm_affine(
    model: nn.Module, std: float = 0.2, generator: torch.Generator | None = None
) -> nn.Module:
    """Draw every LayerNorm's gamma from N(1, std) and beta from N(0, std), in place; returns ``model``."""
    for module in model.modules():
        if not _is_layer_norm(module):
            continue
        if module.weight is not None:
            w = torch.randn(module.weight.shape, generator=generator, dtype=torch.float64)
            module.weight.copy_((1.0 + std * w).to(module.weight.dtype))
        if getattr(module, "bias", None) is not None:
            b = torch.randn(module.bias.shape, generator=generator, dtype=torch.float64)
            module.bias.copy_((std * b).to(module.bias.dtype))
    return model


@torch.no_grad()
def randomize_biases(
    model: nn.Module, std: float = 0.02, generator: torch.Generator | None = None
) -> nn.Module:
    """Draw every non-norm 1-D ``*bias`` parameter from N(0, std) (they are often zero-initialized)."""
    norm_params = {id(p) for m in model.modules() if _is_layer_norm(m) for p in m.parameters(recurse=False)}
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] == "bias" and p.dim() == 1 and id(p) not in norm_params:
            p.copy_((std * torch.randn(p.shape, generator=generator, dtype=torch.float64)).to(p.dtype))
    return model


@torch.no_grad()
def randomize_named(
    model: nn.Module, suffix: str, mean: float, std: float, generator: torch.Generator | None = None
) -> nn.Module:
    """Draw every parameter whose name ends with ``suffix`` (e.g. ``"gamma"`` of LayerScales) from N(mean, std)."""
    for name, p in model.named_parameters():
        if name.endswith(suffix):
            p.copy_((mean + std * torch.randn(p.shape, generator=generator, dtype=torch.float64)).to(p.dtype))
    return model


def run_eval(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` in eval mode, without grad, on ``inputs`` (a tensor, a tuple of args, or (args, kwargs))."""
    return run(model, *split_inputs(inputs))


def assert_equivalent(
    model: nn.Module,
    folded: nn.Module,
    make_inputs: Callable[[], Any],
    tol: float | None = None,
    trials: int = 1,
) -> float:
    """Run both models on ``trials`` fresh inputs from ``make_inputs()``; assert max relative error <= tol.

    The error is max |folded - original| / RMS(original) over every floating output
    (:func:`lightning_cbwc.verify.max_relative_error`).  ``tol`` defaults by output dtype (float64: 1e-10,
    float32: 1e-5).  Returns the largest error seen.
    """
    worst = 0.0
    for _ in range(trials):
        inputs = make_inputs()
        ref, got = run_eval(model, inputs), run_eval(folded, inputs)
        err = max_relative_error(ref, got)
        if tol is None:
            dtypes = {t.dtype for t in output_tensors(ref)}
            tol = 1e-10 if dtypes <= {torch.float64} else 1e-5
        assert err <= tol, f"folded model differs from the original: max relative error {err:.3g} > {tol:.3g}"
        worst = max(worst, err)
    return worst


def normalized_dims(norm: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    """The dims ``norm`` (an RMSNorm, RMSNorm2d or LayerNorm) normalizes of its input ``x``."""
    from lightning_cbwc import RMSNorm2d

    if isinstance(norm, RMSNorm2d):
        return (1,)
    return tuple(range(x.dim() - len(norm.normalized_shape), x.dim()))


def input_mean_ratios(model: nn.Module, names: list[str], inputs: list[Any]) -> dict[str, float]:
    """Largest |mean| / RMS over its normalized dims of the input of each norm in ``names``, over ``inputs``
    (each run in eval mode without grad); a norm that is never called is missing from the result."""
    ratios: dict[str, float] = {}

    def hook(mod, args, name):
        x = args[0]
        dims = normalized_dims(mod, x)
        rms = x.pow(2).mean(dims).sqrt().clamp_min(torch.finfo(x.dtype).tiny)
        ratios[name] = max(ratios.get(name, 0.0), float((x.mean(dims).abs() / rms).max()))

    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda mod, args, n=n: hook(mod, args, n))
        for n in names
    ]
    try:
        for inp in inputs:
            run_eval(model, inp)
    finally:
        for h in handles:
            h.remove()
    return ratios


def assert_fold_oracle(
    model: nn.Module, folded: nn.Module, fresh: list[Any], tol: float = 1e-10, mean_tol: float = 1e-9
) -> float:
    """The oracle for a float64 fold: on every input of ``fresh``, each site the plan calls foldable gets a
    zero-mean input (|mean| / RMS <= ``mean_tol``) and every floating output of ``folded`` equals the
    original's (max relative error <= ``tol``).  Returns the largest output error."""
    plan = folded.cbwc_plan
    names = [s.name for s in plan.foldable]
    ratios = input_mean_ratios(folded, names, fresh)
    for name in names:
        assert name in ratios, f"{name} is called foldable but never ran on the fresh inputs\n{plan}"
        assert ratios[name] <= mean_tol, (
            f"{name}: input not zero-mean (|mean|/RMS {ratios[name]:.3g})\n{plan}"
        )
    worst = 0.0
    for inp in fresh:
        err = max_relative_error(run_eval(model, inp), run_eval(folded, inp))
        assert err <= tol, f"folded outputs differ: max relative error {err:.3g} > {tol:.3g}\n{plan}"
        worst = max(worst, err)
    return worst


def rms_norm_reference(x, shape, weight=None, bias=None, eps=1e-5):
    """RMSNorm + bias by the formula, in float64 (the reference for the kernel tests)."""
    x64 = x.double()
    dims = tuple(range(-len(shape), 0))
    y = x64 * torch.rsqrt(x64.square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y
