"""The RMSNorm kernels behind ``lightning_cbwc.norm.rms_norm``: values, gradients, compile, export, fallback.

CPU only.  The first test that needs the C++ kernel builds it (~35 s on a 2-core machine, cached after that
in the torch extensions dir).  Tests of the op are skipped only when no C++ compiler exists; a build error
with a compiler present fails them.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers import rms_norm_reference as reference
from torch import nn

from lightning_cbwc.norm import RMSNorm, RMSNorm2d
from lightning_cbwc.norm import cpu as norm_cpu
from lightning_cbwc.norm import functional as fn
from lightning_cbwc.norm import ops as norm_ops

HAVE_COMPILER = bool(os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++"))
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(scope="module")
def kernel():
    """The C++ op, built or loaded; fails (not skips) when a compiler exists but the build breaks."""
    if not HAVE_COMPILER:
        pytest.skip("no C++ compiler: the C++ kernel cannot be built here")
    os.environ.pop("LIGHTNING_CBWC_DISABLE_KERNELS", None)
    norm_cpu._reset()
    fn._reset_backend()
    ok, reason = norm_cpu.load()
    assert ok, reason
    assert fn.load_kernels()
    assert "C++ kernel" in fn.kernel_status(), fn.kernel_status()
    return torch.ops.lightning_cbwc.rms_norm.default


def assert_close(actual, expected, tol):
    """Elementwise: |a - e| <= tol * (|e| + max|e|), so a wrong term anywhere shows up."""
    expected = expected.double()
    actual = actual.double()
    assert actual.shape == expected.shape
    if expected.numel() == 0:
        return
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(scale, 1e-30))


def make(shape, nshape, dtype, weight=True, bias=True, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + 0.3 * scale).to(dtype)
    w = (torch.randn(nshape, generator=g, dtype=torch.float64) + 1).to(dtype) if weight else None
    b = torch.randn(nshape, generator=g, dtype=torch.float64).to(dtype) if bias else None
    return x, w, b


SHAPES = [
    ((5, 7), (7,)),
    ((3, 4, 33), (33,)),
    ((16, 769), (769,)),
    ((64, 768), (768,)),
    ((256, 1024), (1024,)),  # > one parallel chunk: both threads, several backward blocks
    ((9, 1), (1,)),
    ((0, 33), (33,)),
    ((2, 0, 48), (48,)),
    ((4, 6, 5), (6, 5)),  # two normalized dims
    ((7, 16), (16,)),  # narrower than one step: the masked tail alone (ConvNeXt's first stage)
    ((5, 3, 40), (40,)),  # one step and a tail of 8
    ((6, 48), (48,)),  # a tail of exactly one vector
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,nshape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", ["wb", "w", "b", "none"])
def test_forward_matches_float64_reference(kernel, shape, nshape, dtype, affine):
    x, w, b = make(shape, nshape, dtype, weight="w" in affine, bias="b" in affine, seed=hash(shape) % 1000)
    y = fn.rms_norm(x, nshape, w, b, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    assert_close(y, reference(x, nshape, w, b), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_magnitude_and_noncontiguous(kernel, dtype):
    # x^2 overflows float16 (and nearly bfloat16's mantissa): accumulation must be float32.
    x, w, b = make((50, 96), (50,), dtype, scale=1e4, seed=3)
    xt = x.t()  # (96, 50), not contiguous
    assert not xt.is_contiguous()
    y = fn.rms_norm(xt, (50,), w, b)
    assert torch.isfinite(y).all()
    assert_close(y, reference(xt, (50,), w, b), TOL[dtype])


def test_mixed_dtype_weight(kernel):
    x, _, _ = make((8, 40), (40,), torch.bfloat16)
    _, w, b = make((8, 40), (40,), torch.float32, seed=1)
    y = fn.rms_norm(x, (40,), w, b)
    assert y.dtype == torch.bfloat16
    assert_close(y, reference(x, (40,), w, b), TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_parameters(kernel, dtype):
    x, _, _ = make((6, 40), (40,), dtype)
    _, w, b = make((6, 80), (80,), dtype, seed=2)
    w, b = w[::2], b[1::2]  # strided views: read through a contiguous copy
    assert not w.is_contiguous()
    assert_close(fn.rms_norm(x, (40,), w, b), reference(x, (40,), w, b), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_stays_in_its_row(kernel, dtype):
    x, w, b = make((4, 100), (100,), dtype)
    x[1, 37] = float("nan")
    y = fn.rms_norm(x, (100,), w, b)
    assert torch.isnan(y[1]).all()
    rest = torch.tensor([0, 2, 3])
    assert torch.isfinite(y[rest]).all()
    assert_close(y[rest], reference(x[rest], (100,), w, b), TOL[dtype])


def test_bf16_rounds_like_torch(kernel):
    """bf16 output = round-to-nearest-even of the float32 result (the AVX2 path narrows with its own code)."""
    x, w, b = make((64, 784), (784,), torch.bfloat16, seed=5)  # 784 = 24 * 32 + 16: every loop of the path
    y = fn.rms_norm(x, (784,), w, b)
    ref32 = fn.rms_norm(x.float(), (784,), w.float(), b.float())
    rounded = ref32.to(torch.bfloat16).float()
    _, exponent = torch.frexp(rounded)  # rounded = m * 2**exponent, 0.5 <= |m| < 1
    ulp = torch.ldexp(torch.ones_like(rounded), exponent - 8)  # bf16 keeps 8 significant bits
    ulps = (y.float() - rounded).abs() / ulp
    assert ulps.max().item() <= 1.0  # at most one bf16 ulp apart (float32 sums in another order)
    assert (y == ref32.to(torch.bfloat16)).float().mean().item() > 0.99


def test_int_normalized_shape_and_shape_errors(kernel):
    x, w, b = make((3, 10), (10,), torch.float32)
    assert_close(fn.rms_norm(x, 10, w, b), reference(x, (10,), w, b), 1e-5)
    with pytest.raises(RuntimeError, match="normalized_shape"):
        fn.rms_norm(x, (11,), None, None)
    with pytest.raises(RuntimeError, match="weight/bias"):
        fn.rms_norm(x, (10,), torch.ones(9), None)


# ------------------------------------------------------------------------------------------------ backward


def _assert_grads_close(ours, want, sources, tol):
    """Each gradient of (x, weight, bias) in its input's dtype and shape, close to the float64 one."""
    for name, got, exp, src in zip("xwb", ours, want, sources, strict=True):
        if src is None:
            assert got is None
            continue
        assert got.dtype == src.dtype and got.shape == src.shape, name
        assert_close(got, exp, tol)


def grads(f, x, w, b, g):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    y = f(*leaves)
    y.backward(g)
    return y, [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,nshape",
    [((5, 7), (7,)), ((3, 11, 33), (33,)), ((300, 769), (769,)), ((128, 512), (512,)), ((4, 6, 5), (6, 5))],
    ids=str,
)
@pytest.mark.parametrize("affine", ["wb", "w", "b", "none"])
def test_backward_matches_float64_autograd(kernel, shape, nshape, dtype, affine):
    x, w, b = make(shape, nshape, dtype, weight="w" in affine, bias="b" in affine, seed=7)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(11)).to(dtype)
    _, ours = grads(lambda x_, w_, b_: fn.rms_norm(x_, nshape, w_, b_), x, w, b, g)
    ref_in = [t.double() if t is not None else None for t in (x, w, b)]
    _, want = grads(lambda x_, w_, b_: reference(x_, nshape, w_, b_), *ref_in, g.double())
    _assert_grads_close(ours, want, (x, w, b), 4 * TOL[dtype])


def _zero_mean(x, nshape):
    dims = tuple(range(-len(nshape), 0))
    return (x.double() - x.double().mean(dim=dims, keepdim=True)).to(x.dtype)


def _assert_layer_norm_gradients(dtype, shape, nshape, affine, seed=3):
    """A centered-input norm on a zero-mean input: values and gradients those of float64 F.layer_norm."""
    x, w, b = make(shape, nshape, dtype, weight="w" in affine, bias="b" in affine, seed=seed)
    x = _zero_mean(x, nshape)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    y, ours = grads(lambda x_, w_, b_: fn.rms_norm(x_, nshape, w_, b_, 1e-5, centered_input=True), x, w, b, g)
    ref_in = [t.double() if t is not None else None for t in (x, w, b)]
    y64, want = grads(lambda x_, w_, b_: F.layer_norm(x_, nshape, w_, b_, 1e-5), *ref_in, g.double())
    assert_close(y, y64, 4 * TOL[dtype])
    _assert_grads_close(ours, want, (x, w, b), 4 * TOL[dtype])


ZERO_MEAN_SHAPES = [((5, 7), (7,)), ((3, 11, 33), (33,)), ((300, 769), (769,)), ((4, 6, 5), (6, 5))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,nshape", ZERO_MEAN_SHAPES, ids=str)
@pytest.mark.parametrize("affine", ["wb", "w", "none"])
def test_zero_mean_norm_backward_is_layer_norms(kernel, shape, nshape, dtype, affine):
    """centered_input with a gradient: the zero_mean_rms_norm op, whose dx is LayerNorm's (RMSNorm's minus
    mean(g * w) / rms), so the gradient reaching the writers is zero-mean by construction."""
    _assert_layer_norm_gradients(dtype, shape, nshape, affine)
    # and the plain op keeps RMSNorm's own gradient on the same input (the two differ along the mean)
    x, w, _ = make((9, 33), (33,), torch.float64, bias=False)
    x = _zero_mean(x, (33,)).requires_grad_(True)
    fn.rms_norm(x, 33, w).sum().backward()
    assert x.grad.mean(-1).abs().max() > 1e-3


MASKS = [[a, b, c] for a in (True, False) for b in (True, False) for c in (True, False) if a or b or c]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("zero_mean", [True, False], ids=["zero_mean", "plain"])
@pytest.mark.parametrize("with_weight", [True, False], ids=["w", "no_w"])
def test_backward_op_each_output_mask(kernel, dtype, zero_mean, with_weight):
    """rms_norm_backward with every output mask (dx alone skips the dweight / dbias partial sums: frozen norm
    parameters, as under LoRA): each output asked for is the float64 reference's, the others are empty."""
    shape, n = (300, 769), 769  # several backward blocks and a tail
    x, w, _ = make(shape, (n,), dtype, bias=False, seed=7)
    x = _zero_mean(x, (n,)) if zero_mean else x
    w = w if with_weight else None
    g = torch.randn(shape, generator=torch.Generator().manual_seed(8)).to(dtype)
    b64 = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    w64 = w.double().requires_grad_(True) if with_weight else None
    x64 = x.double().requires_grad_(True)
    ref = F.layer_norm if zero_mean else reference
    ref(x64, (n,), w64, b64, 1e-5).backward(g.double())
    want = [x64.grad, w64.grad if with_weight else None, b64.grad]
    op = torch.ops.lightning_cbwc.rms_norm_backward.default
    for mask in MASKS:
        got = op(g, x, [n], w, 1e-5, mask, zero_mean)
        for asked, out, expected in zip(mask, got, want, strict=True):
            if asked and expected is not None:
                assert_close(out, expected, 4 * TOL[dtype])
            else:
                assert out.numel() == 0, (mask, out.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_zero_mean_norm_backward_without_kernel_is_layer_norms(fresh_backend, dtype):
    fresh_backend.setenv("LIGHTNING_CBWC_DISABLE_KERNELS", "1")
    for env in ("", "composite"):
        fresh_backend.setenv("LIGHTNING_CBWC_FALLBACK", env)
        fn._reset_backend()
        for shape, nshape in ZERO_MEAN_SHAPES[:2]:
            _assert_layer_norm_gradients(dtype, shape, nshape, "wb")


def test_backward_noncontiguous_grad_empty_batch_and_partial_grads(kernel):
    x, w, b = make((40, 24), (40,), torch.float32)
    xt = x.t().detach().requires_grad_(True)  # (24, 40) non-contiguous leaf
    g = torch.randn(40, 24).t()  # non-contiguous grad
    wr, br = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    fn.rms_norm(xt, (40,), wr, br).backward(g)
    xr = xt.detach().double().requires_grad_(True)
    w64, b64 = w.double().requires_grad_(True), b.double().requires_grad_(True)
    reference(xr, (40,), w64, b64).backward(g.double())
    assert_close(xt.grad, xr.grad, 1e-4)
    assert_close(wr.grad, w64.grad, 1e-4)
    assert_close(br.grad, b64.grad, 1e-4)

    # empty batch: zero parameter grads
    x0 = torch.zeros(0, 40, requires_grad=True)
    w0, b0 = torch.ones(40, requires_grad=True), torch.zeros(40, requires_grad=True)
    fn.rms_norm(x0, (40,), w0, b0).sum().backward()
    assert x0.grad.shape == (0, 40)
    assert torch.equal(w0.grad, torch.zeros(40)) and torch.equal(b0.grad, torch.zeros(40))

    # only the weight needs a grad (frozen input, frozen bias)
    w1 = w.clone().requires_grad_(True)
    xd = xt.detach()
    fn.rms_norm(xd, (40,), w1, b).backward(g)
    w64 = w.double().requires_grad_(True)
    reference(xd, (40,), w64, b).backward(g.double())
    assert_close(w1.grad, w64.grad, 1e-4)


@pytest.mark.parametrize("affine", ["wb", "w", "none"])
def test_gradcheck_float64(kernel, affine):
    """float64 runs the C++ kernel itself (templated on double, double accumulation)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True) if "w" in affine else None
    b = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True) if "b" in affine else None
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def f(*args):
        it = iter(args)
        return kernel(
            next(it), [4, 5], next(it) if w is not None else None, next(it) if b is not None else None, 1e-5
        )

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)
    x1 = torch.randn(6, 9, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: kernel(t, [9], None, None, 1e-3), (x1,))


def test_double_backward_raises_instead_of_silent_zeros(kernel):
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(fn.rms_norm(x, (5,), w, None).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(gx.sum(), x)


# ------------------------------------------------------------------------------------- compile and export


def _count(graph: torch.fx.Graph, target) -> int:
    return sum(1 for n in graph.nodes if n.op == "call_function" and n.target == target)


def test_torch_compile_aot_eager_one_op_forward_and_backward(kernel):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs: dict[str, list[torch.fx.GraphModule]] = {"dynamo": [], "fw": [], "bw": []}

    def fw(gm, _):
        graphs["fw"].append(gm)
        return make_boxed_func(gm.forward)

    def bw(gm, _):
        graphs["bw"].append(gm)
        return make_boxed_func(gm.forward)

    aot = aot_autograd(fw_compiler=fw, bw_compiler=bw)

    def backend(gm, example_inputs):
        graphs["dynamo"].append(gm)
        return aot(gm, example_inputs)

    torch._dynamo.reset()
    norm = RMSNorm(48)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    compiled = torch.compile(norm, backend=backend, fullgraph=True)
    x = torch.randn(4, 6, 48, requires_grad=True)
    y = compiled(x)
    g = torch.randn_like(y)
    y.backward(g)
    ref_x = x.detach().clone().requires_grad_(True)
    ref_y = norm(ref_x)
    ref_y.backward(g)
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(x.grad, ref_x.grad)
    assert len(graphs["dynamo"]) == 1
    assert _count(graphs["dynamo"][0].graph, torch.ops.lightning_cbwc.rms_norm.default) == 1
    assert _count(graphs["fw"][0].graph, torch.ops.lightning_cbwc.rms_norm.default) == 1
    assert _count(graphs["bw"][0].graph, torch.ops.lightning_cbwc.rms_norm_backward.default) == 1
    torch._dynamo.reset()


def test_torch_compile_traces_the_zero_mean_norm_and_its_layer_norm_backward(kernel):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs: dict[str, list[torch.fx.GraphModule]] = {"dynamo": [], "bw": []}

    def bw(gm, _):
        graphs["bw"].append(gm)
        return make_boxed_func(gm.forward)

    aot = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=bw)

    def backend(gm, example_inputs):
        graphs["dynamo"].append(gm)
        return aot(gm, example_inputs)

    torch._dynamo.reset()
    assert fn.load_kernels()  # as documented: resolve the kernel before torch.compile
    norm = RMSNorm.from_layer_norm(nn.LayerNorm(48))
    x = _zero_mean(torch.randn(4, 6, 48), (48,)).requires_grad_(True)
    compiled = torch.compile(norm, backend=backend, fullgraph=True)
    g = torch.randn(4, 6, 48)
    compiled(x).backward(g)
    ref_x = x.detach().clone().requires_grad_(True)
    F.layer_norm(ref_x, (48,), norm.weight, norm.bias, norm.eps).backward(g)
    torch.testing.assert_close(x.grad, ref_x.grad)
    assert _count(graphs["dynamo"][0].graph, torch.ops.lightning_cbwc.zero_mean_rms_norm.default) == 1
    (node,) = [
        n
        for n in graphs["bw"][0].graph.nodes
        if n.target == torch.ops.lightning_cbwc.rms_norm_backward.default
    ]
    assert node.args[-1] is True or node.kwargs.get("zero_mean") is True
    torch._dynamo.reset()


def test_torch_compile_eager_backend_dynamic_shapes(kernel):
    torch._dynamo.reset()
    f = torch.compile(
        lambda t, w: fn.rms_norm(t, (32,), w, None), backend="eager", fullgraph=True, dynamic=True
    )
    w = torch.randn(32)
    for rows in (3, 17, 64):
        x = torch.randn(rows, 32)
        assert_close(f(x, w), reference(x, (32,), w), 1e-5)
    torch._dynamo.reset()


@pytest.mark.slow
def test_torch_compile_inductor(kernel):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(16, 32), RMSNorm(32), nn.GELU(), nn.Linear(32, 8))
    compiled = torch.compile(model, backend="inductor")
    x = torch.randn(10, 16, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    y2 = model(x2)
    y2.sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_torch_export_sees_one_op(kernel):
    model = nn.Sequential(nn.Linear(12, 24), RMSNorm(24))
    x = torch.randn(5, 12)
    ep = torch.export.export(model, (x,))
    assert _count(ep.graph, torch.ops.lightning_cbwc.rms_norm.default) == 1
    torch.testing.assert_close(ep.module()(x), model(x))
    decomposed = ep.run_decompositions()
    assert _count(decomposed.graph, torch.ops.lightning_cbwc.rms_norm.default) == 1
    torch.testing.assert_close(decomposed.module()(x), model(x))


# ------------------------------------------------------------------------------------------------ modules


def test_modules_use_the_kernel_and_match_layer_norm_on_zero_mean_input(kernel):
    ln = nn.LayerNorm(64)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(10, 64)
    x = x - x.mean(-1, keepdim=True)
    norm = RMSNorm.from_layer_norm(ln)
    torch.testing.assert_close(norm(x), ln(x), rtol=1e-5, atol=1e-5)
    norm2d = RMSNorm2d(8)
    x4 = torch.randn(2, 8, 3, 5)
    assert_close(
        norm2d(x4), reference(x4.movedim(1, -1), (8,), norm2d.weight, norm2d.bias).movedim(-1, 1), 1e-5
    )


# ------------------------------------------------------------------------------------------------ fallback


@pytest.fixture
def fresh_backend(monkeypatch):
    """Lets a test re-pick the backend; the kernel state is restored afterwards."""
    fn._reset_backend()
    yield monkeypatch
    monkeypatch.undo()
    norm_cpu._reset()
    fn._reset_backend()


def test_env_var_forces_fallback(fresh_backend):
    fresh_backend.setenv("LIGHTNING_CBWC_DISABLE_KERNELS", "1")
    status = fn.kernel_status()
    assert "fallback" in status and "LIGHTNING_CBWC_DISABLE_KERNELS" in status, status
    assert fn._cpu_op is None
    for dtype in (torch.float32, torch.bfloat16):
        x, w, b = make((6, 4, 33), (4, 33), dtype)
        assert_close(fn.rms_norm(x, (4, 33), w, b), reference(x, (4, 33), w, b), TOL[dtype])
    x, w, b = make((7, 19), (19,), torch.float64)
    g = torch.randn(7, 19, dtype=torch.float64)
    _, got = grads(lambda x_, w_, b_: fn.rms_norm(x_, (19,), w_, b_), x, w, b, g)
    _, want = grads(lambda x_, w_, b_: reference(x_, (19,), w_, b_), x, w, b, g)
    for a, e in zip(got, want, strict=True):
        assert_close(a, e, 1e-10)
    assert_close(fn.rms_norm(torch.zeros(0, 5), (5,)), torch.zeros(0, 5), 1e-6)


def test_layer_norm_fallback_is_opt_in(fresh_backend):
    fresh_backend.setenv("LIGHTNING_CBWC_DISABLE_KERNELS", "1")
    fresh_backend.setenv("LIGHTNING_CBWC_FALLBACK", "layer_norm")
    assert "F.layer_norm" in fn.kernel_status()
    x, w, b = make((6, 32), (32,), torch.float32)
    zero_mean = x - x.mean(-1, keepdim=True)
    assert_close(fn.rms_norm(zero_mean, (32,), w, b), reference(zero_mean, (32,), w, b), 1e-5)
    # and it is NOT RMSNorm on an input with a mean: the reason it is opt-in
    assert not torch.allclose(fn.rms_norm(x, (32,), w, b).double(), reference(x, (32,), w, b), atol=1e-3)


def test_fallback_without_kernel_depends_on_the_input(fresh_backend):
    """No kernel: folded norms (zero-mean input) run F.layer_norm, never slower than the LN they replaced;
    other RMSNorm layers run the composite, which is RMSNorm on any input."""
    import torch.nn.functional as F
    from torch import nn

    from lightning_cbwc.norm import RMSNorm

    fresh_backend.setenv("LIGHTNING_CBWC_DISABLE_KERNELS", "1")
    fresh_backend.delenv("LIGHTNING_CBWC_FALLBACK", raising=False)
    assert "F.layer_norm for folded norms" in fn.kernel_status()
    x, w, b = make((6, 32), (32,), torch.float32)  # make() adds a mean
    assert_close(fn.rms_norm(x, (32,), w, b), reference(x, (32,), w, b), 1e-5)
    assert torch.equal(
        fn.rms_norm(x, (32,), w, b, 1e-5, centered_input=True), F.layer_norm(x, (32,), w, b, 1e-5)
    )
    zero_mean = x - x.mean(-1, keepdim=True)
    got = fn.rms_norm(zero_mean, (32,), w, b, 1e-5, centered_input=True)
    assert_close(got, reference(zero_mean, (32,), w, b), 1e-5)

    folded = RMSNorm.from_layer_norm(nn.LayerNorm(32))
    assert folded.centered_input and not RMSNorm(32).centered_input
    assert torch.equal(folded(x), F.layer_norm(x, (32,), folded.weight, folded.bias, folded.eps))
    fresh_backend.setenv("LIGHTNING_CBWC_FALLBACK", "composite")
    fn._reset_backend()
    with torch.no_grad():  # with a gradient, a folded norm always takes LayerNorm's backward (F.layer_norm)
        assert_close(folded(x), reference(x, (32,), folded.weight, folded.bias, folded.eps), 1e-5)


def test_build_failure_warns_once_and_falls_back(fresh_backend, caplog):
    from torch.utils import cpp_extension

    def broken_load(*args, **kwargs):
        raise RuntimeError("Error building extension 'x':\nrms_norm.cpp:1:1: error: no compiler today")

    fresh_backend.delenv("LIGHTNING_CBWC_DISABLE_KERNELS", raising=False)
    fresh_backend.setattr(norm_cpu, "_already_registered", lambda: False)
    fresh_backend.setattr(cpp_extension, "load", broken_load)
    norm_cpu._reset()
    with caplog.at_level(logging.WARNING, logger="lightning_cbwc"):
        x, w, b = make((3, 20), (20,), torch.float32)
        y1 = fn.rms_norm(x, (20,), w, b)
        y2 = fn.rms_norm(x, (20,), w, b)
        assert norm_cpu.load()[0] is False
    warnings = [r for r in caplog.records if r.name == "lightning_cbwc" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "no compiler today" in warnings[0].getMessage()
    assert "no compiler today" in fn.kernel_status()
    assert_close(y1, reference(x, (20,), w, b), 1e-5)
    assert torch.equal(y1, y2)


def test_composite_matches_torch_rms_norm():
    x, w, b = make((8, 3, 50), (50,), torch.float32)
    want = F.rms_norm(x, (50,), w, 1e-6) + b
    torch.testing.assert_close(norm_ops.rms_norm_composite(x, (50,), w, b, 1e-6), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError):
        norm_ops.rms_norm_composite(torch.ones(2, 3, dtype=torch.int64), (3,), None, None, 1e-5)


def test_build_flags_define_the_cpu_capability():
    cflags, ldflags = norm_cpu.build_flags("AVX2")
    assert {"-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2", "-fopenmp", "-mavx2"} <= set(cflags)
    assert "-fopenmp" in ldflags
    cflags512, _ = norm_cpu.build_flags("AVX512")
    assert "-DCPU_CAPABILITY_AVX512" in cflags512
    assert norm_cpu.extension_name("AVX2") != norm_cpu.extension_name("AVX512")


# ---------------------------------------------------------------------------------------------------------
# Fused residual add + RMSNorm


def add_reference(x, r, nshape, w, b):
    """(y, h) in float64, the norm taken of h rounded to x's dtype (what the unfused add hands the norm)."""
    h = (x.double() + r.double()).to(x.dtype)
    return reference(h, nshape, w, b), h


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,nshape", [s for s in SHAPES if 0 not in s[0]], ids=str)
@pytest.mark.parametrize("affine", ["wb", "w", "none"])
def test_add_rms_norm_forward_matches_float64(kernel, shape, nshape, dtype, affine):
    x, w, b = make(shape, nshape, dtype, weight="w" in affine, bias="b" in affine, seed=7)
    r, _, _ = make(shape, nshape, dtype, seed=8)
    y, h = fn.add_rms_norm(x, r, nshape, w, b)
    y_ref, h_ref = add_reference(x, r, nshape, w, b)
    assert y.dtype == h.dtype == dtype and y.shape == h.shape == x.shape
    assert torch.equal(h, h_ref)  # the sum rounded once, exactly as x + r
    assert_close(y, y_ref, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,dim", [(1, 769), (3, 33), (40, 96)])  # few rows (16-bit params read raw), many
def test_add_rms_norm_gradients_match_float64_autograd(kernel, dtype, rows, dim):
    x, w, b = make((rows, dim), (dim,), dtype, seed=9)
    r, _, _ = make((rows, dim), (dim,), dtype, seed=10)
    gen = torch.Generator().manual_seed(11)
    gy, gh = (torch.randn(rows, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    leaves = [t.clone().requires_grad_(True) for t in (x, r, w, b)]
    y, h = fn.add_rms_norm(*leaves[:2], (dim,), *leaves[2:])
    torch.autograd.backward((y, h), (gy.to(dtype), gh.to(dtype)))
    ref = [t.detach().double().requires_grad_(True) for t in (x, r, w, b)]
    h64 = ref[0] + ref[1]
    y64 = reference(h64, (dim,), ref[2], ref[3])
    torch.autograd.backward((y64, h64), (gy.to(dtype).double(), gh.to(dtype).double()))
    for got, want in zip(leaves, ref, strict=True):
        assert_close(got.grad, want.grad, 4 * TOL[dtype])


def test_add_rms_norm_errors_fallback_and_compile(kernel, fresh_backend):
    x, w, b = make((4, 8), (8,), torch.float32)
    with pytest.raises(RuntimeError, match="no broadcasting"):
        fn.add_rms_norm(x, x[:1], (8,), w, b)
    with pytest.raises(RuntimeError, match="must match"):
        fn.add_rms_norm(x, x.double(), (8,), w, b)
    fused = torch.compile(lambda a, c: fn.add_rms_norm(a, c, (8,), w, b), backend="aot_eager", fullgraph=True)
    y_ref, h_ref = add_reference(x, x.flip(0), (8,), w, b)
    y, h = fused(x, x.flip(0))
    assert torch.equal(h, h_ref)
    assert_close(y, y_ref, TOL[torch.float32])
    fresh_backend.setenv("LIGHTNING_CBWC_DISABLE_KERNELS", "1")  # without the kernel: the add, then rms_norm
    y, h = fn.add_rms_norm(x, x.flip(0), (8,), w, b)
    assert torch.equal(h, h_ref)
    assert_close(y, y_ref, TOL[torch.float32])


def test_cpu_measure_picks_the_faster_path_for_folded_norms(kernel, fresh_backend):
    fresh_backend.setenv("LIGHTNING_CBWC_CPU_KERNEL", "measure")
    fn.load_kernels()
    assert fn._cpu_measure
    x, _, _ = make((5, 24), (24,), torch.float32)
    x = x - x.mean(-1, keepdim=True)  # a folded norm's input is zero-mean
    measured = fn._time_candidates(fn._cpu_candidates(), (x, (24,), None, None, 1e-5))
    assert set(measured) == {"kernel", "layer_norm"} and min(measured.values()) > 0
    calls = []

    def counted(name, f):
        return lambda *args: calls.append(name) or f(*args)

    candidates = {
        "kernel": counted("kernel", norm_ops.cpu_op()),
        "layer_norm": counted("layer_norm", F.layer_norm),
    }
    fresh_backend.setattr(fn, "_cpu_candidates", lambda: candidates)
    fresh_backend.setattr(fn, "_time_candidates", lambda c, a: {"kernel": 2e-6, "layer_norm": 1e-6})
    norm = RMSNorm.from_layer_norm(nn.LayerNorm(24))
    with torch.no_grad():
        y = norm(x)
        norm(x.repeat(2, 1)[:7])  # the same bucket (5-8 rows): no new measurement
    assert fn._cpu_choice == {(torch.float32, 24, 8, True, True): "layer_norm"}
    assert calls == ["layer_norm", "layer_norm"]
    assert "measured per shape" in fn.kernel_status()
    assert_close(y, reference(x, (24,), norm.weight, norm.bias), TOL[torch.float32])
    calls.clear()
    y = norm(x)  # autograd: always the kernel itself (its backward is RMSNorm's)
    assert y.grad_fn is not None and not calls
    with torch.no_grad():
        RMSNorm(24)(x + 1)  # not a folded norm: its input need not be zero-mean, so no F.layer_norm
    assert not calls and len(fn._cpu_choice) == 1


def test_cpu_kernel_mode_default_and_bad_value(kernel, fresh_backend):
    fn.load_kernels()
    assert fn._cpu_measure == (norm_cpu.capability() not in ("AVX2", "AVX512"))
    fresh_backend.setenv("LIGHTNING_CBWC_CPU_KERNEL", "fastest")
    fn._reset_backend()
    with pytest.raises(ValueError, match="use auto, measure or kernel"):
        fn.load_kernels()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [1, 37, 64, 768])
def test_centered_embedding_matches_float64(kernel, dtype, dim):
    from lightning_cbwc.centering import CenteredEmbedding

    table = torch.nn.Embedding(50, dim).to(dtype)
    ids = torch.randint(50, (3, 5), generator=torch.Generator().manual_seed(dim))
    rows = table.weight.double()[ids]
    want = rows - rows.mean(-1, keepdim=True)
    assert_close(fn.centered_embedding(table.weight, ids.int()), want, TOL[dtype])
    centered = CenteredEmbedding.adopt(table)
    with torch.no_grad():  # inference: the one-call op
        assert_close(centered(ids), want, TOL[dtype])
    trained = centered(ids)  # autograd: Embedding's own lookup, so padding_idx / sparse gradients hold
    assert trained.grad_fn is not None
    assert_close(trained.detach(), want, 2 * TOL[dtype])


@pytest.mark.parametrize("padding_idx,by_freq", [(None, False), (3, False), (None, True)])
def test_centered_embedding_with_zero_mean_gradient_trains_like_the_composite(kernel, padding_idx, by_freq):
    """zero_mean_grad (CBWC training, every norm exact): one C++ lookup-and-center, and the plain lookup's
    backward, which equals the centered lookup's on a zero-mean incoming gradient."""
    from lightning_cbwc.centering import CenteredEmbedding

    g = torch.Generator().manual_seed(0)
    table = torch.nn.Embedding(20, 33, padding_idx=padding_idx, scale_grad_by_freq=by_freq).double()
    ids = torch.randint(20, (4, 9), generator=g)
    ids[0, :3] = 3
    grad = torch.randn(4, 9, 33, generator=g, dtype=torch.float64)
    grad = grad - grad.mean(-1, keepdim=True)
    ref = CenteredEmbedding.adopt(copy.deepcopy(table))
    fast = CenteredEmbedding.adopt(table)
    fast.zero_mean_grad = True
    y_ref, y = ref(ids), fast(ids)
    assert "CenteredLookup" in type(y.grad_fn).__name__
    y_ref.backward(grad)
    y.backward(grad)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-14)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=0, atol=1e-13)
    if padding_idx is not None:
        assert not fast.weight.grad[padding_idx].any()


def test_centered_embedding_errors_and_empty(kernel):
    weight = torch.randn(10, 4)
    with pytest.raises(RuntimeError, match="index 10 out of range for 10 embeddings"):
        fn.centered_embedding(weight, torch.tensor([3, 10]))
    with pytest.raises(RuntimeError, match="int64 or int32"):
        fn.centered_embedding(weight, torch.tensor([1.0]))
    assert fn.centered_embedding(weight, torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3, 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_center_columns_in_one_call_matches_float64(kernel, dtype):
    """The per-step re-centering of every writer in one C++ call: each tensor minus its float64 mean over its
    dim (Linear and Conv weights over dim 0, HF Conv1D over dim 1, biases), empty ones untouched; a strided
    tensor goes through the per-tensor path."""
    from lightning_cbwc.centering import fast_center_all_

    g = torch.Generator().manual_seed(2)
    shapes = [((7, 5), 0), ((384, 97), 0), ((3, 4, 130), 1), ((1536,), 0), ((16, 3, 3, 3), 0), ((0, 4), 0)]
    shapes += [((50, 33), 1), ((2, 5, 70), 2)]  # over the last dim (HF Conv1D, an embedding table): rows
    tensors = [(torch.randn(s, generator=g, dtype=torch.float64) + 1).to(dtype) for s, _ in shapes]
    strided = (torch.randn(9, 40, generator=g, dtype=torch.float64) + 1).to(dtype).t()  # (40, 9), dim 0
    tensors.append(strided)
    dims = [d for _, d in shapes] + [0]
    want = [t.double() - t.double().mean(d, keepdim=True) for t, d in zip(tensors, dims, strict=True)]
    versions = [t._version for t in tensors]
    fast_center_all_(tensors, dims)
    for t, w, v in zip(tensors, want, versions, strict=True):
        assert_close(t, w, 2 * TOL[dtype])
        assert t.numel() == 0 or t._version > v  # autograd sees the in-place change
    assert fn.center_columns_([], [])
    with pytest.raises(RuntimeError, match="2 tensors but 1 dims"):
        fn.center_columns_([torch.ones(2, 2), torch.ones(2)], [0])


def test_center_columns_without_kernel_reports_and_the_projection_still_centers(fresh_backend):
    from lightning_cbwc.centering import fast_center_all_

    fresh_backend.setenv("LIGHTNING_CBWC_DISABLE_KERNELS", "1")
    t = torch.randn(30, 8, dtype=torch.float64) + 2
    assert not fn.center_columns_([t], [0])
    assert t.mean(0).abs().min() > 0.5  # nothing done
    fast_center_all_([t], [0])
    assert t.mean(0).abs().max() < 1e-14
