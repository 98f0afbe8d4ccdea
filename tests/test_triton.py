"""The Triton RMSNorm (+ bias) kernels for CUDA, run on CPU tensors by Triton's interpreter.

Triton picks interpreted or compiled kernels when it is imported, so without a GPU this file runs itself
again in a subprocess with ``TRITON_INTERPRET=1`` (``test_interpreted``); on a GPU (benchmarks/gpu.sh) the
same tests run compiled.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from helpers import rms_norm_reference as reference  # noqa: E402

from lightning_cbwc.norm import triton_rms_norm  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
RUNS_HERE = torch.cuda.is_available() or INTERPRETED

# Unit roundoff of each dtype: one rounding of the output costs at most this, relative to the value.
ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, slack: float = 4.0
) -> None:
    """|actual - expected| <= slack * roundoff * (|expected| + RMS(expected)), elementwise."""
    bound = slack * ROUNDOFF[dtype] * (expected.abs() + scale(expected))
    excess = (actual.cpu().double() - expected).abs() - bound
    assert excess.max().item() <= 0, f"max error over the bound: {excess.max().item():.3g}"


@pytest.mark.slow
@pytest.mark.skipif(RUNS_HERE, reason="the kernel tests run in this process")
def test_interpreted():
    """Every test below, in a fresh process with Triton's interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    # Only this test itself may be skipped there: every kernel test must have run.
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.search(r"\b\d+ passed", summary) and re.search(r"\b1 skipped", summary), summary


@pytest.fixture(scope="module")
def kernels():
    """The kernel module and the device its tests run on (interpreted: CPU tensors)."""
    if not RUNS_HERE:
        pytest.skip("needs a GPU or TRITON_INTERPRET=1 (test_interpreted runs these)")
    return triton_rms_norm, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def scale(t: torch.Tensor) -> float:
    return max(t.double().square().mean().sqrt().item(), 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 33), (7, 1), (4, 2, 3), (0, 8)])
@pytest.mark.parametrize("affine", ["wb", "w", "b", "none"])
def test_forward_matches_float64(kernels, dtype, shape, affine):
    mod, device = kernels
    gen = torch.Generator().manual_seed(hash((shape, affine)) % 2**31)
    norm_shape = shape[-1:] if shape != (4, 2, 3) else shape[-2:]
    x = (torch.randn(shape, generator=gen) * 3).to(dtype).to(device)
    w = (torch.randn(norm_shape, generator=gen) + 1).to(dtype).to(device) if "w" in affine else None
    b = torch.randn(norm_shape, generator=gen).to(dtype).to(device) if "b" in affine else None
    y = mod.rms_norm(x, tuple(norm_shape), w, b, 1e-5)
    ref = reference(x.cpu(), norm_shape, None if w is None else w.cpu(), None if b is None else b.cpu(), 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    if x.numel():
        assert_close(y, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", ["wb", "w", "none"])
def test_backward_matches_float64(kernels, dtype, affine):
    mod, device = kernels
    gen = torch.Generator().manual_seed(7)
    rows, n = 9, 37  # more rows than the interpreter's 4 programs: each program sums several rows
    x0 = torch.randn(rows, n, generator=gen).to(dtype)
    w0 = (torch.randn(n, generator=gen) + 1).to(dtype) if "w" in affine else None
    b0 = torch.randn(n, generator=gen).to(dtype) if "b" in affine else None
    g0 = torch.randn(rows, n, generator=gen).to(dtype)
    leaves = [t for t in (x0, w0, b0) if t is not None]
    ours = [t.to(device).clone().requires_grad_(True) for t in leaves]
    ref = [t.detach().double().requires_grad_(True) for t in leaves]

    def unpack(ts):
        it = iter(ts)
        return next(it), (next(it) if w0 is not None else None), (next(it) if b0 is not None else None)

    y = mod.rms_norm(*unpack(ours)[:1], (n,), *unpack(ours)[1:], 1e-5)
    y.backward(g0.to(device))
    yr = reference(ref[0], (n,), *unpack(ref)[1:], 1e-5)
    yr.backward(g0.double())
    for mine, theirs in zip(ours, ref, strict=True):
        assert mine.grad is not None and mine.grad.dtype == mine.dtype
        # dweight / dbias sum over rows: the bound grows with their number
        assert_close(mine.grad, theirs.grad, dtype, slack=4.0 * rows)


def test_no_grad_path_skips_the_saved_statistics(kernels):
    mod, device = kernels
    x = torch.randn(4, 16, device=device, requires_grad=True)
    with torch.no_grad():
        y = mod.rms_norm(x, (16,), None, None, 1e-6)
    assert y.grad_fn is None
    ref = reference(x.detach().cpu(), (16,), None, None, 1e-6)
    assert (y.cpu().double() - ref).abs().max() <= 1e-6


def test_shape_mismatch_is_a_clear_error(kernels):
    mod, device = kernels
    with pytest.raises(ValueError, match="does not end with"):
        mod.rms_norm(torch.randn(2, 3, device=device), (4,), None, None, 1e-5)


def test_supports_limits():
    x = torch.randn(2, 8)
    assert triton_rms_norm.supports(x, 8)
    assert not triton_rms_norm.supports(x.double(), 8)
    assert not triton_rms_norm.supports(x, triton_rms_norm.MAX_FUSED_DIM + 1)


def test_cuda_kernel_env_choice(monkeypatch):
    from lightning_cbwc.norm import functional

    monkeypatch.delenv("LIGHTNING_CBWC_CUDA_KERNEL", raising=False)
    assert functional._cuda_mode() == "auto"
    monkeypatch.setenv("LIGHTNING_CBWC_CUDA_KERNEL", "Triton")
    assert functional._cuda_mode() == "triton"
    monkeypatch.setenv("LIGHTNING_CBWC_CUDA_KERNEL", "cudnn")
    with pytest.raises(ValueError, match="use auto, torch or triton"):
        functional._cuda_mode()
