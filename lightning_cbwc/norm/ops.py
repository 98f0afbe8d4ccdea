"""The ``lightning_cbwc::rms_norm`` custom op and the pure-torch paths beside it.

Op schema (defined in C++, ``csrc/rms_norm.cpp``, with ``TORCH_LIBRARY_FRAGMENT``)::

    lightning_cbwc::rms_norm(Tensor x, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps)
        -> Tensor
    lightning_cbwc::zero_mean_rms_norm(Tensor x, int[] normalized_shape, Tensor? weight, Tensor? bias,
        float eps) -> Tensor     # the same forward, LayerNorm's backward: for inputs zero-mean by construction
    lightning_cbwc::rms_norm_backward(Tensor grad, Tensor x, int[] normalized_shape, Tensor? weight,
        float eps, bool[3] output_mask, bool zero_mean=False) -> (Tensor dx, Tensor dweight, Tensor dbias)
    lightning_cbwc::add_rms_norm(Tensor x, Tensor residual, int[] normalized_shape, Tensor? weight,
        Tensor? bias, float eps) -> (Tensor y, Tensor h)        # h = x + residual, y = rms_norm(h)
    lightning_cbwc::centered_embedding(Tensor weight, Tensor indices) -> Tensor   # rows minus their means
    lightning_cbwc::center_columns_(Tensor(a!)[] tensors, int[] dims) -> ()     # each minus its mean, in place

Kernels: CPU (float32 / float64 / bfloat16 / float16) and Autograd (a C++ autograd Function whose backward
calls ``rms_norm_backward``) live in C++, so an eager call is one dispatcher hop with no Python in between;
the fake (meta) kernels below are registered from Python when the library loads, so ``torch.compile`` and
``torch.export`` see one opaque op (forward) and one backward op.  Outputs of ``rms_norm_backward`` not asked
for in ``output_mask`` come back as empty (size 0) tensors.

Why not ``torch.library.custom_op``: its Python wrapper and Python autograd glue cost tens of microseconds per
call, which is most of the time of a small norm (BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

_fakes_registered = False


def register_fakes() -> None:
    """Register the fake kernels (called once, after the C++ library defined the ops)."""
    global _fakes_registered
    if _fakes_registered:
        return

    @torch.library.register_fake("lightning_cbwc::rms_norm")
    def _rms_norm_fake(x, normalized_shape, weight, bias, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("lightning_cbwc::zero_mean_rms_norm")
    def _zero_mean_rms_norm_fake(x, normalized_shape, weight, bias, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("lightning_cbwc::rms_norm_backward")
    def _rms_norm_backward_fake(grad, x, normalized_shape, weight, eps, output_mask, zero_mean=False):
        dx = x.new_empty(x.shape) if output_mask[0] else x.new_empty((0,))
        if output_mask[1] and weight is not None:
            dw = weight.new_empty(tuple(normalized_shape))
        else:
            dw = x.new_empty((0,))
        db = x.new_empty(tuple(normalized_shape)) if output_mask[2] else x.new_empty((0,))
        return dx, dw, db

    @torch.library.register_fake("lightning_cbwc::add_rms_norm")
    def _add_rms_norm_fake(x, residual, normalized_shape, weight, bias, eps):
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        return out, torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("lightning_cbwc::centered_embedding")
    def _centered_embedding_fake(weight, indices):
        return weight.new_empty((*indices.shape, weight.shape[1]))

    _fakes_registered = True


def cpu_op():
    """``torch.ops.lightning_cbwc.rms_norm.default`` (the library must be loaded)."""
    return torch.ops.lightning_cbwc.rms_norm.default


def cpu_zero_mean_op():
    """``torch.ops.lightning_cbwc.zero_mean_rms_norm.default`` (the library must be loaded)."""
    return torch.ops.lightning_cbwc.zero_mean_rms_norm.default


def cpu_add_op():
    """``torch.ops.lightning_cbwc.add_rms_norm.default`` (the library must be loaded)."""
    return torch.ops.lightning_cbwc.add_rms_norm.default


# --------------------------------------------------------------------------------------------------------
# Pure-torch paths


def rms_norm_composite(
    x: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """Correct RMSNorm from stock torch ops (the fallback when the C++ kernel is unavailable).

    One reduction (``vector_norm`` with float32 accumulation, float64 for float64) and one fused affine
    (``addcmul``), computed in float32 for 16-bit inputs and rounded once: faster than ``F.rms_norm`` + bias
    on CPU, still slower than ``F.layer_norm``.
    """
    k = len(normalized_shape)
    dims = tuple(range(-k, 0))
    n = 1
    for s in normalized_shape:
        n *= int(s)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if not x.is_floating_point():
        raise TypeError(f"rms_norm: expected a floating point input, got {x.dtype}")
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=acc)
    rstd = torch.rsqrt(norm.square() / max(n, 1) + eps)
    y = x * rstd  # promotes 16-bit inputs to float32
    if weight is not None and bias is not None:
        y = torch.addcmul(bias, y, weight)
    elif weight is not None:
        y = y * weight
    elif bias is not None:
        y = y + bias
    return y.to(x.dtype)


def rms_norm_torch_fused(
    x: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """torch's own ``F.rms_norm`` plus the bias (fused on CUDA)."""
    y = F.rms_norm(x, tuple(normalized_shape), weight, eps)
    if bias is not None:
        y = y + bias
    return y


def layer_norm_zero_mean(
    x: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """``F.layer_norm``: equal to RMSNorm ONLY when ``x`` is zero-mean over the normalized dims.

    Opt-in fallback (``LIGHTNING_CBWC_FALLBACK=layer_norm``) for folded models, whose norm inputs are
    zero-mean by construction: never slower than the LayerNorm the fold replaced.  On other inputs it
    subtracts the mean and so does NOT compute RMSNorm.
    """
    return F.layer_norm(x, tuple(normalized_shape), weight, bias, eps)
