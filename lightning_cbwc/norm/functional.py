"""The functional RMSNorm entry point: every RMSNorm module calls :func:`rms_norm`.

y = x / sqrt(mean(x^2 over the normalized dims) + eps) * weight + bias.  The kernels behind it live in this
package; this module picks one:

* CPU: the fused C++ kernel behind the ``lightning_cbwc::rms_norm`` custom op (``ops.py``, ``cpu.py``),
  built on first use.  If it cannot be built (no compiler, ...; one warning on the ``lightning_cbwc``
  logger says why) or ``LIGHTNING_CBWC_DISABLE_KERNELS=1``: a correct pure-torch composite.  Setting
  ``LIGHTNING_CBWC_FALLBACK=layer_norm`` makes that fallback ``F.layer_norm`` instead, which is never slower
  than the LayerNorm a fold replaced but is only RMSNorm on zero-mean inputs (folded models).
* CUDA: torch's fused ``F.rms_norm`` plus the bias (a Triton kernel can slot into ``_cuda_rms_norm``).
* anything else: torch's ``F.rms_norm`` plus the bias.

Call :func:`load_kernels` (or :func:`kernel_status`) before ``torch.compile`` so the first build does not
happen while dynamo traces.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from . import cpu as _cpu
from . import ops as _ops

# Dtypes the C++ kernel takes; others go to the composite path.
_KERNEL_DTYPES = frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16})

# Resolved on first CPU call: the C++ op (or None) and the fallback.
_resolved = False
_cpu_op: Callable | None = None
_cpu_fallback: Callable = _ops.rms_norm_composite
_cpu_reason = "not resolved yet (first CPU call builds or loads the kernel)"


def _fallback_from_env() -> tuple[Callable, str]:
    mode = os.environ.get("LIGHTNING_CBWC_FALLBACK", "").strip().lower()
    if mode in ("layer_norm", "layernorm", "ln"):
        return (
            _ops.layer_norm_zero_mean,
            "F.layer_norm (LIGHTNING_CBWC_FALLBACK=layer_norm; zero-mean inputs only)",
        )
    return _ops.rms_norm_composite, "pure-torch composite (vector_norm + addcmul)"


@torch.compiler.disable
def _resolve() -> Callable | None:
    """Build / load the CPU kernel once and pick the CPU path. Runs eagerly even under torch.compile."""
    global _resolved, _cpu_op, _cpu_fallback, _cpu_reason
    if _resolved:
        return _cpu_op
    fallback, fb_desc = _fallback_from_env()
    ok, reason = _cpu.load()
    _cpu_fallback = fallback
    if ok:
        _cpu_op = _ops.cpu_op()
        _cpu_reason = reason
    else:
        _cpu_op = None
        _cpu_reason = f"fallback {fb_desc}: {reason}"
    _resolved = True
    return _cpu_op


def _reset_backend() -> None:
    """Re-read the env vars and re-pick the CPU path on the next call (tests)."""
    global _resolved, _cpu_op, _cpu_reason
    _resolved = False
    _cpu_op = None
    _cpu_reason = "not resolved yet (first CPU call builds or loads the kernel)"


def load_kernels() -> bool:
    """Build / load the CPU kernel now (instead of on first use); True when it is in use."""
    return _resolve() is not None


def kernel_status() -> str:
    """Which backend each device uses and why, in one short line (loads the CPU kernel if needed)."""
    _resolve()
    cuda = "torch F.rms_norm + bias" if torch.cuda.is_available() else "torch F.rms_norm + bias (no GPU here)"
    return f"cpu: {_cpu_reason}; cuda: {cuda}"


def _cuda_rms_norm(
    x: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    # Place for a fused Triton kernel (RMSNorm + bias in one pass); torch's fused F.rms_norm until then.
    return _ops.rms_norm_torch_fused(x, normalized_shape, weight, bias, eps)


def rms_norm(
    x: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """RMSNorm over the trailing ``normalized_shape`` dims, with an optional added bias."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if x.is_cpu:
        op = _cpu_op if _resolved else _resolve()
        if op is not None and x.dtype in _KERNEL_DTYPES:
            return op(x, shape, weight, bias, eps)
        return _cpu_fallback(x, shape, weight, bias, eps)
    if x.is_cuda:
        return _cuda_rms_norm(x, shape, weight, bias, eps)
    return _ops.rms_norm_torch_fused(x, shape, weight, bias, eps)
