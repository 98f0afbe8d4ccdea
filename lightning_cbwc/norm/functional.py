"""The functional RMSNorm entry point: every RMSNorm module calls :func:`rms_norm`.

y = x / sqrt(mean(x^2 over the normalized dims) + eps) * weight + bias.  The kernels behind it live in this
package; this module picks one:

* CPU: the fused C++ kernel behind the ``lightning_cbwc::rms_norm`` custom op (``ops.py``, ``cpu.py``),
  built on first use.  If it cannot be built (no compiler, ...; one warning on the ``lightning_cbwc``
  logger says why) or ``LIGHTNING_CBWC_DISABLE_KERNELS=1``, the fallback depends on the input:
  a norm whose input is zero-mean by construction (``centered_input=True``: every RMSNorm a fold or CBWC
  swapped in) runs ``F.layer_norm``, which computes the same function there and is never slower than the
  LayerNorm it replaced; any other input runs a correct pure-torch composite.
  ``LIGHTNING_CBWC_FALLBACK=layer_norm`` or ``=composite`` forces one of the two for every norm.
  Where the kernel has no SIMD build, folded norms outside autograd run the faster of it and
  ``F.layer_norm``, measured per shape bucket (``LIGHTNING_CBWC_CPU_KERNEL``).
* CUDA: the faster of torch's fused ``F.rms_norm`` + bias and the Triton kernel with the bias fused in
  (``triton_rms_norm.py``), measured on the first call of each (dtype, dim, rows bucket) and remembered;
  ``LIGHTNING_CBWC_CUDA_KERNEL=torch|triton`` pins one.  Under ``torch.compile`` torch's op is traced
  (inductor fuses it with the bias itself).
* anything else: torch's ``F.rms_norm`` plus the bias.

A norm with ``centered_input`` that needs a gradient (CBWC training) computes LayerNorm's backward on every
device: the ``lightning_cbwc::zero_mean_rms_norm`` op on CPU, ``F.layer_norm`` elsewhere or without the
kernel (whatever ``LIGHTNING_CBWC_FALLBACK`` says).

Call :func:`load_kernels` (or :func:`kernel_status`) before ``torch.compile`` so the first build does not
happen while dynamo traces.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence

import torch

from . import cpu as _cpu
from . import ops as _ops
from . import triton_rms_norm as _triton

logger = logging.getLogger("lightning_cbwc")

# Dtypes the C++ kernel takes; others go to the composite path.
_KERNEL_DTYPES = frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16})

# Resolved on first CPU call: the C++ op (or None) and the fallbacks for general / zero-mean inputs.
# ``_cpu_call`` is the op's C++ callable: what ``OpOverload.__call__`` calls, one Python frame less (~0.9 us of
# a ~4 us call at decode sizes).
_resolved = False
_cpu_op: Callable | None = None
_cpu_call: Callable | None = None
_cpu_zero_mean_call: Callable | None = None
_cpu_add_op: Callable | None = None
_cpu_embed_op: Callable | None = None
_cpu_center_op: Callable | None = None
_cpu_fallback: Callable = _ops.rms_norm_composite
_cpu_centered_fallback: Callable = _ops.layer_norm_zero_mean
_cpu_reason = "not resolved yet (first CPU call builds or loads the kernel)"


def _fallback_from_env() -> tuple[Callable, Callable, str]:
    """(fallback for any input, fallback for zero-mean inputs, description)."""
    mode = os.environ.get("LIGHTNING_CBWC_FALLBACK", "").strip().lower()
    if mode in ("layer_norm", "layernorm", "ln"):
        return (
            _ops.layer_norm_zero_mean,
            _ops.layer_norm_zero_mean,
            "F.layer_norm for every norm (LIGHTNING_CBWC_FALLBACK=layer_norm; zero-mean inputs only)",
        )
    if mode == "composite":
        return (
            _ops.rms_norm_composite,
            _ops.rms_norm_composite,
            "pure-torch composite for every norm (LIGHTNING_CBWC_FALLBACK=composite)",
        )
    return (
        _ops.rms_norm_composite,
        _ops.layer_norm_zero_mean,
        "F.layer_norm for folded norms (zero-mean input), pure-torch composite for the others",
    )


@torch.compiler.disable
def _resolve() -> Callable | None:
    """Build / load the CPU kernel once and pick the CPU path. Runs eagerly even under torch.compile."""
    global _resolved, _cpu_op, _cpu_call, _cpu_add_op, _cpu_embed_op, _cpu_fallback, _cpu_centered_fallback
    global _cpu_reason, _cpu_measure, _cpu_zero_mean_call, _cpu_center_op
    if _resolved:
        return _cpu_call
    fallback, centered_fallback, fb_desc = _fallback_from_env()
    mode = _cpu_mode()
    ok, reason = _cpu.load()
    _cpu_measure = ok and (
        mode == "measure" or (mode == "auto" and _cpu.capability() not in ("AVX2", "AVX512"))
    )
    _cpu_fallback = fallback
    _cpu_centered_fallback = centered_fallback
    if ok:
        _cpu_op = _ops.cpu_op()
        _cpu_call = getattr(_cpu_op, "_op", _cpu_op)
        _cpu_zero_mean_call = getattr(_ops.cpu_zero_mean_op(), "_op", _ops.cpu_zero_mean_op())
        _cpu_add_op = getattr(_ops.cpu_add_op(), "_op", _ops.cpu_add_op())
        embed = torch.ops.lightning_cbwc.centered_embedding.default
        _cpu_embed_op = getattr(embed, "_op", embed)
        center = torch.ops.lightning_cbwc.center_columns_.default
        _cpu_center_op = getattr(center, "_op", center)
        _cpu_reason = reason
    else:
        _cpu_op = _cpu_call = _cpu_add_op = _cpu_embed_op = _cpu_zero_mean_call = _cpu_center_op = None
        _cpu_reason = f"fallback {fb_desc}: {reason}"
    _resolved = True
    return _cpu_call


def _reset_backend() -> None:
    """Re-read the env vars and re-pick the CPU path on the next call (tests)."""
    global _resolved, _cpu_op, _cpu_call, _cpu_add_op, _cpu_embed_op, _cpu_reason, _cpu_measure
    global _cpu_zero_mean_call, _cpu_center_op
    _resolved = _cpu_measure = False
    _cpu_zero_mean_call = _cpu_center_op = None
    _cpu_embed_op = None
    _cpu_choice.clear()
    _cpu_op = _cpu_call = _cpu_add_op = None
    _cpu_reason = "not resolved yet (first CPU call builds or loads the kernel)"


def load_kernels() -> bool:
    """Build / load the CPU kernel now (instead of on first use); True when it is in use."""
    return _resolve() is not None


def kernel_status() -> str:
    """Which backend each device uses and why, in one short line (loads the CPU kernel if needed)."""
    _resolve()
    mode = _cuda_mode()
    if not torch.cuda.is_available():
        cuda = "no GPU here"
    elif mode == "torch" or not _triton.available():
        cuda = "torch F.rms_norm + bias"
    elif mode == "triton":
        cuda = "Triton (LIGHTNING_CBWC_CUDA_KERNEL=triton)"
    else:
        picked = ", ".join(f"{k[1]} {k[3]}x{k[2]}: {v}" for k, v in _cuda_choice.items())
        cuda = "fastest of torch F.rms_norm + bias and Triton, measured per shape" + (
            f" ({picked})" if picked else ""
        )
    cpu = _cpu_reason
    if _cpu_measure:
        picked = ", ".join(f"{k[0]} {k[2]}x{k[1]}: {v}" for k, v in _cpu_choice.items())
        cpu += "; folded norms without autograd: the faster of it and F.layer_norm, measured per shape"
        cpu += f" ({picked})" if picked else ""
    return f"cpu: {cpu}; cuda: {cuda}"


# --------------------------------------------------------------------------------------------------------
# CPU: for a zero-mean input (a folded norm) without autograd, the faster of the kernel and F.layer_norm (the
# same function there), measured on the first call of each (dtype, dim, rows bucket, affine).  On by default
# only where the kernel is built without SIMD (ARM, POWER, ...: ATen's own LayerNorm is vectorized there);
# on AVX2 / AVX-512 builds the kernel measured faster at every shape (BENCHMARKS.md), so no call pays for a
# lookup.  LIGHTNING_CBWC_CPU_KERNEL=measure measures everywhere, =kernel never.
_cpu_measure = False
_cpu_choice: dict[tuple, str] = {}


def _env_mode(var: str, modes: tuple[str, ...]) -> str:
    """The value of the kernel-choice variable ``var`` (default: the first of ``modes``), checked."""
    mode = os.environ.get(var, modes[0]).strip().lower() or modes[0]
    if mode not in modes:
        raise ValueError(f"{var}={mode!r}: use {', '.join(modes[:-1])} or {modes[-1]}")
    return mode


def _cpu_mode() -> str:
    return _env_mode("LIGHTNING_CBWC_CPU_KERNEL", ("auto", "measure", "kernel"))


def _cpu_candidates() -> dict[str, Callable]:
    return {"kernel": _cpu_call, "layer_norm": _ops.layer_norm_zero_mean}


def _median_s(fn: Callable[[], object], reps: int = 9) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2]


@torch.compiler.disable
def _centered_cpu(x, shape, weight, bias, eps) -> torch.Tensor:
    """The faster CPU path for this bucket (measured on its first call) on a zero-mean input."""
    n = math.prod(shape)
    rows = x.numel() // max(n, 1)
    key = (x.dtype, n, 1 << max(rows - 1, 0).bit_length(), weight is not None, bias is not None)
    candidates = _cpu_candidates()
    choice = _cpu_choice.get(key)
    if choice is None:
        times = _time_candidates(candidates, (x, shape, weight, bias, eps))
        choice = _cpu_choice[key] = min(times, key=times.get)
        logger.debug("lightning_cbwc: CPU RMSNorm %s: %s (%s s)", key, choice, times)
    return candidates[choice](x, shape, weight, bias, eps)


def _time_candidates(candidates: dict[str, Callable], args: tuple) -> dict[str, float]:
    """Median seconds per call of each candidate on ``args`` (after one warm-up call each)."""
    with torch.no_grad():
        for f in candidates.values():
            f(*args)
        return {k: _median_s(lambda f=f: f(*args)) for k, f in candidates.items()}


# (device, dtype, dim, rows bucket, has weight, has bias) -> "torch" | "triton"
_cuda_choice: dict[tuple, str] = {}


def _cuda_mode() -> str:
    return _env_mode("LIGHTNING_CBWC_CUDA_KERNEL", ("auto", "torch", "triton"))


def _median_ms(fn: Callable[[], object], reps: int = 15) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@torch.compiler.disable
def _pick_cuda(key: tuple, x, shape, weight, bias, eps) -> str:
    """Time both CUDA paths on this input (forward, no grad) and remember the faster one for ``key``."""
    candidates = {
        "torch": lambda: _ops.rms_norm_torch_fused(x, shape, weight, bias, eps),
        "triton": lambda: _triton.rms_norm(x, shape, weight, bias, eps),
    }
    with torch.no_grad():
        for fn in candidates.values():  # warm-up (Triton compiles here)
            fn()
        times = {name: _median_ms(fn) for name, fn in candidates.items()}
    choice = min(times, key=times.get)
    logger.debug("lightning_cbwc: CUDA RMSNorm %s: %s (%s ms)", key, choice, times)
    _cuda_choice[key] = choice
    return choice


def _cuda_rms_norm(
    x: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    n = math.prod(normalized_shape)
    mode = _cuda_mode()
    if mode == "torch" or torch.compiler.is_compiling() or not _triton.supports(x, n):
        return _ops.rms_norm_torch_fused(x, normalized_shape, weight, bias, eps)
    if mode == "auto":
        rows = x.numel() // n
        key = (x.device, x.dtype, n, 1 << max(rows - 1, 0).bit_length(), weight is not None, bias is not None)
        choice = _cuda_choice.get(key)
        if choice is None:
            if torch.cuda.is_current_stream_capturing():  # no timing inside a CUDA graph capture
                return _ops.rms_norm_torch_fused(x, normalized_shape, weight, bias, eps)
            choice = _pick_cuda(key, x, normalized_shape, weight, bias, eps)
        if choice == "torch":
            return _ops.rms_norm_torch_fused(x, normalized_shape, weight, bias, eps)
    return _triton.rms_norm(x, normalized_shape, weight, bias, eps)


def _needs_grad(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    return (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )


def rms_norm(
    x: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    centered_input: bool = False,
) -> torch.Tensor:
    """RMSNorm over the trailing ``normalized_shape`` dims, with an optional added bias.

    ``centered_input=True`` promises that ``x`` is zero-mean over those dims (a folded LayerNorm's input,
    an exact CBWC site).  The forward is the same; the backward is then LayerNorm's, RMSNorm's ``dx`` minus
    ``mean(dy * weight) / rms``: the gradient of the LayerNorm model, so the writers upstream receive
    zero-mean gradients by construction and need no gradient projection.  On CPU without the kernel it runs
    ``F.layer_norm`` (the same function there), faster than the composite.
    """
    if type(normalized_shape) is tuple:
        shape = normalized_shape
    else:
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if centered_input and torch.is_grad_enabled() and _needs_grad(x, weight, bias):
        return _zero_mean_with_grad(x, shape, weight, bias, eps)
    if x.is_cpu:
        op = _cpu_call if _resolved else _resolve()
        if op is not None and x.dtype in _KERNEL_DTYPES:
            if torch.compiler.is_compiling():  # dynamo traces the OpOverload, not its C++ callable
                return _cpu_op(x, shape, weight, bias, eps)
            if (
                _cpu_measure
                and centered_input
                and not (torch.is_grad_enabled() and _needs_grad(x, weight, bias))
            ):
                return _centered_cpu(x, shape, weight, bias, eps)
            return op(x, shape, weight, bias, eps)
        fallback = _cpu_centered_fallback if centered_input else _cpu_fallback
        return fallback(x, shape, weight, bias, eps)
    if x.is_cuda:
        return _cuda_rms_norm(x, shape, weight, bias, eps)
    return _ops.rms_norm_torch_fused(x, shape, weight, bias, eps)


def _zero_mean_with_grad(x, shape, weight, bias, eps) -> torch.Tensor:
    """RMSNorm of a zero-mean input with LayerNorm's backward: the C++ op on CPU, else ``F.layer_norm`` (the
    same function and gradient on a zero-mean input; on CUDA as fast as the LayerNorm it replaced)."""
    if x.is_cpu and x.dtype in _KERNEL_DTYPES:
        op = _cpu_zero_mean_call if _resolved else (_resolve() and _cpu_zero_mean_call)
        if op is not None:
            if torch.compiler.is_compiling():
                return _ops.cpu_zero_mean_op()(x, shape, weight, bias, eps)
            return op(x, shape, weight, bias, eps)
    return _ops.layer_norm_zero_mean(x, shape, weight, bias, eps)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(h), h)`` with ``h = x + residual``: a pre-norm block's residual add and norm in one op.

    On CPU one C++ kernel writes both (one read of ``h`` less than the add and the norm apart); elsewhere, or
    without the kernel, the add and :func:`rms_norm`.  Same shapes and dtypes, no broadcasting.
    """
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if x.is_cpu and residual.is_cpu and x.dtype in _KERNEL_DTYPES:
        if not _resolved:
            _resolve()
        if _cpu_add_op is not None:
            if torch.compiler.is_compiling():
                return _ops.cpu_add_op()(x, residual, shape, weight, bias, eps)
            return _cpu_add_op(x, residual, shape, weight, bias, eps)
    h = x + residual
    return rms_norm(h, shape, weight, bias, eps), h


def centered_embedding(weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``weight[indices]`` with each row minus its mean, for inference (no gradient): one C++ call on CPU,
    else the lookup, the mean and the subtraction."""
    if (
        weight.is_cpu
        and indices.is_cpu
        and weight.dtype in _KERNEL_DTYPES
        and not torch.compiler.is_compiling()
    ):
        if not _resolved:
            _resolve()
        if _cpu_embed_op is not None and not (torch.is_grad_enabled() and weight.requires_grad):
            return _cpu_embed_op(weight, indices)
    rows = torch.nn.functional.embedding(indices, weight)
    return rows - rows.mean(dim=-1, keepdim=True)


def center_columns_(tensors: Sequence[torch.Tensor], dims: Sequence[int]) -> bool:
    """Each tensor minus its mean over its dim, in place, in one C++ call (two passes over each, no
    per-tensor dispatch): the per-step weight re-centering.  Contiguous plain CPU tensors of the kernel's
    dtypes only; returns False, having changed nothing, where the kernel is not available."""
    if not _resolved:
        _resolve()
    if _cpu_center_op is None:
        return False
    if tensors:  # the dispatcher needs a tensor to pick the kernel
        _cpu_center_op(list(tensors), list(dims))
    torch.autograd.graph.increment_version(list(tensors))
    return True
