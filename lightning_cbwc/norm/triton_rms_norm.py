"""Triton RMSNorm with the bias fused in, for CUDA: y = x * rstd * weight + bias in one pass over x.

torch's fused CUDA ``F.rms_norm`` has no bias, so a folded LayerNorm costs it a second pass (``+ bias``);
these kernels do the whole fold in one read of x and one write of y (forward), and one read of x and dy and
one write of dx (backward; dweight / dbias from per-program partial sums reduced by torch).  Which of the two
paths a shape runs is decided by measurement in ``functional.py``.

Tested on CPU tensors with Triton's interpreter (``TRITON_INTERPRET=1``); compiled for real only on a GPU.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch's Linux CUDA wheels
    triton = None
    tl = None

# Widest row a single program holds in registers; wider rows stay on torch's kernel.
MAX_FUSED_DIM = 16384


def available() -> bool:
    """True when Triton is importable (the kernels still need a CUDA device, or the interpreter)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _rms_norm_fwd(
        X,
        Y,
        W,
        B,
        RSTD,
        N,
        eps,
        HAS_W: tl.constexpr,
        HAS_B: tl.constexpr,
        SAVE_RSTD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        y = x * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)
        if SAVE_RSTD:
            tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_norm_bwd(
        DY,
        X,
        W,
        RSTD,
        DX,
        DW_PART,
        DB_PART,
        ROWS,
        N,
        ROWS_PER_PROGRAM,
        HAS_W: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
        db = tl.zeros((BLOCK,), dtype=tl.float32)
        start = pid * ROWS_PER_PROGRAM
        end = tl.minimum(start + ROWS_PER_PROGRAM, ROWS)
        off = start.to(tl.int64) * N  # int64: rows * N can pass 2**31
        for row in range(start, end):
            x = tl.load(X + off + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + off + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            xhat = x * rstd
            if HAS_W:
                wdy = dy * w
            else:
                wdy = dy
            c = tl.sum(xhat * wdy, axis=0) / N
            tl.store(DX + off + cols, ((wdy - xhat * c) * rstd).to(DX.dtype.element_ty), mask=mask)
            dw += dy * xhat
            db += dy
            off += N
        tl.store(DW_PART + pid * N + cols, dw, mask=mask)
        tl.store(DB_PART + pid * N + cols, db, mask=mask)


def _block(n: int) -> tuple[int, int]:
    block = triton.next_power_of_2(n)
    return block, min(max(block // 256, 1), 16)


def _backward_programs(device: torch.device, rows: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 4 * sms))
    return max(1, min(rows, 4))  # the interpreter (tests)


def supports(x: torch.Tensor, n: int) -> bool:
    """Whether these kernels take this input (a float dtype, rows no wider than MAX_FUSED_DIM)."""
    return (
        available() and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and 0 < n <= MAX_FUSED_DIM
    )


def _flatten(x, weight, bias, normalized_shape):
    """x as contiguous (rows, n) and the parameters as contiguous length-n vectors (or None)."""
    n = math.prod(normalized_shape)
    w = weight.reshape(-1).contiguous() if weight is not None else None
    b = bias.reshape(-1).contiguous() if bias is not None else None
    return x.reshape(-1, n).contiguous(), w, b


def _forward(x2, weight, bias, eps, save_rstd):
    rows, n = x2.shape
    y = torch.empty_like(x2)
    rstd = torch.empty(rows if save_rstd else 1, device=x2.device, dtype=torch.float32)
    if rows:
        block, warps = _block(n)
        _rms_norm_fwd[(rows,)](
            x2,
            y,
            weight if weight is not None else x2,
            bias if bias is not None else x2,
            rstd,
            n,
            eps,
            HAS_W=weight is not None,
            HAS_B=bias is not None,
            SAVE_RSTD=save_rstd,
            BLOCK=block,
            num_warps=warps,
        )
    return y, rstd


class _TritonRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, normalized_shape, eps):
        x2, w, b = _flatten(x, weight, bias, normalized_shape)
        y, rstd = _forward(x2, w, b, eps, save_rstd=True)
        ctx.save_for_backward(x2, w, rstd)
        ctx.shape = x.shape
        ctx.has_b = bias is not None
        ctx.dtypes = (
            weight.dtype if weight is not None else None,
            bias.dtype if bias is not None else None,
        )
        ctx.normalized_shape = normalized_shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, rstd = ctx.saved_tensors
        rows, n = x2.shape
        dy2 = dy.reshape(rows, n).to(x2.dtype).contiguous()
        dx = torch.empty_like(x2)
        programs = _backward_programs(x2.device, rows)
        dw_part = torch.empty(programs, n, device=x2.device, dtype=torch.float32)
        db_part = torch.empty(programs, n, device=x2.device, dtype=torch.float32)
        if rows:
            block, warps = _block(n)
            _rms_norm_bwd[(programs,)](
                dy2,
                x2,
                w if w is not None else x2,
                rstd,
                dx,
                dw_part,
                db_part,
                rows,
                n,
                triton.cdiv(rows, programs),
                HAS_W=w is not None,
                BLOCK=block,
                num_warps=warps,
            )
        else:
            dw_part.zero_()
            db_part.zero_()
        w_dtype, b_dtype = ctx.dtypes
        dw = dw_part.sum(0).to(w_dtype).view(ctx.normalized_shape) if w is not None else None
        db = db_part.sum(0).to(b_dtype).view(ctx.normalized_shape) if ctx.has_b else None
        return dx.view(ctx.shape), dw, db, None, None


def rms_norm(
    x: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """RMSNorm + bias over the trailing ``normalized_shape`` dims with the Triton kernels (autograd-aware)."""
    if triton is None:
        raise RuntimeError(
            "triton is not installed: `pip install triton` (it ships with torch's CUDA wheels)"
        )
    if x.shape[x.dim() - len(normalized_shape) :] != torch.Size(normalized_shape):
        raise ValueError(f"rms_norm: input of shape {tuple(x.shape)} does not end with {normalized_shape}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _TritonRMSNorm.apply(x, weight, bias, tuple(normalized_shape), float(eps))
    x2, w, b = _flatten(x, weight, bias, normalized_shape)
    y, _ = _forward(x2, w, b, float(eps), save_rstd=False)
    return y.view(x.shape)
