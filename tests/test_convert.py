"""convert(): in-place CBWC conversion, both training modes, plain state-dict keys, equivalence while training."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_cbwc import CaptureError
from lightning_cbwc.centering import max_column_mean
from lightning_cbwc.errors import UnsupportedError
from lightning_cbwc.norm import RMSNorm
from lightning_cbwc.surgery import center_writers
from lightning_cbwc.training import attach, convert, converted_state, unparametrize
from lightning_cbwc.training.parametrize import Centering, ScaledCentering
from lightning_cbwc.training.projection import max_writer_column_mean, project_, projection_targets
from lightning_cbwc.training.state import MARKER

MODES = ["project", "parametrize"]


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class ResidualNet(nn.Module):
    """Pre-LN residual stream: stem + pos + blocks + final norm + head; every LayerNorm folds."""

    def __init__(self, d_in: int = 6, d: int = 16, depth: int = 2, n_out: int = 3, tokens: int = 4) -> None:
        super().__init__()
        self.stem = nn.Linear(d_in, d)
        self.pos = nn.Parameter(torch.randn(tokens, d) * 0.5)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x) + self.pos
        for b in self.blocks:
            h = b(h)
        return self.head(self.norm(h).mean(dim=1))


def _net(dtype=torch.float64, seed: int = 0) -> ResidualNet:
    torch.manual_seed(seed)
    net = ResidualNet().to(dtype)
    with torch.no_grad():  # trained-looking (non-trivial) norm parameters and uncentered writers
        for m in net.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
            if isinstance(m, nn.Linear):
                m.bias.normal_(0.2, 0.3)
    return net


def _data(dtype=torch.float64, n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


@pytest.mark.parametrize("mode", MODES)
def test_convert_swaps_norms_centers_writers_same_outputs(mode):
    net = _net()
    x, _ = _data()
    ref = net(x)
    ln_weights = [m.weight for m in net.modules() if isinstance(m, nn.LayerNorm)]
    plan = convert(net, (x,), mode=mode)
    assert len(plan.foldable) == 3 and not plan.not_foldable
    norms = [m for m in net.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 3 and not any(isinstance(m, nn.LayerNorm) for m in net.modules())
    assert [n.weight for n in norms] == ln_weights  # the very same Parameter objects
    torch.testing.assert_close(net(x), ref, rtol=0, atol=1e-12)
    assert max_writer_column_mean(net) < 1e-14
    state = converted_state(net)
    assert state.mode == mode and state.max_error < 1e-12
    if mode == "parametrize":
        assert isinstance(net.blocks[0].fc2.parametrizations.weight[0], Centering)
        assert not state.projected  # stream parameters too (on the root module)
        assert isinstance(net.parametrizations.pos[0], Centering)
    else:
        assert not state.parametrized


@pytest.mark.parametrize("mode", MODES)
def test_convert_is_idempotent(mode):
    net = _net()
    x, _ = _data()
    plan = convert(net, (x,), mode=mode)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modules = list(net.modules())
    assert convert(net, (x,), mode=mode) is plan
    with pytest.warns(UserWarning, match="already converted"):
        assert convert(net, (x,), mode=MODES[1 - MODES.index(mode)]) is plan
    assert list(net.modules()) == modules
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    # a parent of a converted module is not converted again
    wrapper = nn.Sequential(net)
    assert convert(wrapper, (x,), mode=mode) is plan
    assert MARKER not in wrapper.__dict__


@pytest.mark.parametrize("mode", MODES)
def test_training_matches_layernorm_model_every_step(mode):
    """CBWC + RMSNorm vs the LayerNorm model with the same centered writers, AdamW with weight decay:
    the same loss at every step (float64)."""
    net = _net()
    x0, _ = _data()
    ln = copy.deepcopy(net)
    plan = convert(net, (x0,), mode=mode)
    center_writers(ln, plan)
    opt_c = torch.optim.AdamW(net.parameters(), lr=3e-2, weight_decay=0.1)
    opt_l = torch.optim.AdamW(ln.parameters(), lr=3e-2, weight_decay=0.1)
    attach(opt_c, net)
    for step in range(12):
        x, y = _data(seed=100 + step)
        losses = []
        for model, opt in ((net, opt_c), (ln, opt_l)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-10, (step, losses)
    assert max_writer_column_mean(net) < 1e-13


def test_layer_norm_backward_makes_gradient_projection_unnecessary():
    """The swapped norms compute LayerNorm's backward, so the writers' gradients are zero-mean by
    construction: attach() registers no gradient hook, and projecting only the weights follows Adam on the
    LayerNorm model exactly (float64)."""
    net = _net()
    x0, _ = _data()
    ln = copy.deepcopy(net)
    plan = convert(net, (x0,), mode="project")
    center_writers(ln, plan)
    opt_c = torch.optim.Adam(net.parameters(), lr=3e-2)
    opt_l = torch.optim.Adam(ln.parameters(), lr=3e-2)
    hooks = attach(opt_c, net)
    assert hooks.targets and not hooks.grad_handles
    diff = 0.0
    for step in range(6):
        x, y = _data(seed=100 + step)
        losses = []
        for model, opt in ((net, opt_c), (ln, opt_l)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        diff = max(diff, abs(losses[0] - losses[1]))
        for t in hooks.targets:
            assert t.tensor.grad.mean(t.dim).abs().max() < 1e-12 * t.tensor.grad.abs().max(), t.name
    assert diff < 1e-10


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_has_plain_keys_and_loads_into_vanilla(mode):
    net = _net()
    vanilla = copy.deepcopy(net)
    x, _ = _data()
    convert(net, (x,), mode=mode)
    sd = net.state_dict()
    assert list(sd) == list(vanilla.state_dict()) or set(sd) == set(vanilla.state_dict())
    assert not any("parametrizations" in k for k in sd)
    vanilla.load_state_dict(sd, strict=True)  # the LayerNorm model computes the same function
    torch.testing.assert_close(vanilla(x), net(x), rtol=0, atol=1e-12)
    # and back into a converted model, strictly, bit-identical
    other = _net(seed=5)
    convert(other, (x,), mode=mode)
    other.load_state_dict(sd, strict=True)
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_loading_an_uncentered_layernorm_checkpoint_recenters_projected_writers():
    trained = _net(seed=3)  # a vanilla LayerNorm checkpoint: writers not centered
    x, _ = _data()
    ref = trained(x)
    net = _net()
    convert(net, (x,))
    net.load_state_dict(trained.state_dict(), strict=True)
    assert max_writer_column_mean(net) < 1e-14
    torch.testing.assert_close(net(x), ref, rtol=0, atol=1e-12)


def test_project_recenters_after_a_plain_step():
    net = _net(torch.float32)
    x, y = _data(torch.float32)
    convert(net, (x,), mode="project")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    assert max_writer_column_mean(net) > 1e-4
    n = project_(net)
    assert n == len(projection_targets(net)) == 7  # stem w/b, pos, 2 x fc2 w/b
    assert max_writer_column_mean(net) < 1e-6


def test_unparametrize_keeps_parameter_objects_and_values():
    net = _net()
    x, _ = _data()
    convert(net, (x,), mode="parametrize")
    params = [p for p in net.parameters()]
    out = net(x)
    assert unparametrize(net) == 7  # stem w/b, pos, 2 x fc2 w/b
    assert not any("parametrizations" in n for n, _ in net.named_parameters())
    assert {id(p) for p in net.parameters()} == {id(p) for p in params}
    torch.testing.assert_close(net(x), out, rtol=0, atol=1e-14)
    assert max_column_mean(net.blocks[0].fc2.weight, 0) < 1e-14
    assert converted_state(net).mode == "parametrize" and not converted_state(net).parametrized


def test_nothing_to_fold_warns_and_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="nothing to convert"):
        plan = convert(model, (torch.randn(2, 8),))
    assert not plan.foldable
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(model, (torch.randn(2, 8),))  # the second call is a silent no-op


def test_not_foldable_layernorm_is_left_alone():
    """The first norm reads the model input (not centered): only the second one folds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 2))
    x = torch.randn(3, 8) + 1
    ref = model(x)
    plan = convert(model, (x,))
    assert [s.name for s in plan.foldable] == ["2"] and [s.name for s in plan.not_foldable] == ["0"]
    assert isinstance(model[2], RMSNorm) and isinstance(model[0], nn.LayerNorm)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        if x.sum().item() > 0:  # data-dependent Python control flow: torch.export cannot capture this
            x = x * 2
        return self.norm(self.fc(x))


def test_uncapturable_model_raises_with_hint_and_is_unchanged():
    model = DataDependent()
    with pytest.raises(CaptureError, match="Fix:"):
        convert(model, (torch.randn(2, 4),))
    assert isinstance(model.norm, nn.LayerNorm) and MARKER not in model.__dict__


class LayerScaleNet(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.stem = nn.Linear(4, d)
        self.norm1 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.gamma = nn.Parameter(torch.rand(d) + 0.5)
        self.norm2 = nn.LayerNorm(d)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.gamma * self.fc(torch.relu(self.norm1(h)))
        return self.head(self.norm2(h))


@pytest.mark.parametrize("mode", MODES)
def test_layerscale_stays_trainable_with_scaled_centering(mode):
    """A writer followed by a LayerScale g is parametrized W = V - mean(g V) / g in both modes: g keeps
    training, g * W is zero-mean, the state dict is the LayerNorm model's (V and g as they are)."""
    torch.manual_seed(0)
    net = LayerScaleNet().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    ref = net(x)
    vanilla_state = {k: v.clone() for k, v in net.state_dict().items()}
    convert(net, (x,), mode=mode)
    state = converted_state(net)
    assert state.layer_scales == ["gamma"] and net.gamma.requires_grad
    assert isinstance(net.fc.parametrizations.weight[0], ScaledCentering)
    assert {w.param for w in state.parametrized} >= {"fc.weight", "fc.bias"}
    torch.testing.assert_close(net(x), ref, rtol=0, atol=1e-12)
    assert max_writer_column_mean(net) < 1e-14
    for k in ("gamma", "fc.weight", "fc.bias"):  # the LayerNorm model's own tensors, under the plain keys
        assert torch.equal(net.state_dict()[k], vanilla_state[k])
    with torch.no_grad():  # g moves: the centering follows it
        net.gamma.mul_(torch.linspace(0.5, 2.0, 8, dtype=torch.float64))
    assert max_writer_column_mean(net) < 1e-14


def test_gpt2_both_modes_train_like_layernorm():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=50,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg).double()
    ids = torch.randint(0, 50, (2, 8))
    for mode in MODES:
        net, ln = copy.deepcopy(base), copy.deepcopy(base)
        plan = convert(net, (ids,), {"use_cache": False}, mode=mode)
        assert len(plan.foldable) == 5
        center_writers(ln, plan)
        assert net.lm_head.weight is net.transformer.wte.weight  # the tie survives
        opt_c = torch.optim.AdamW(net.parameters(), lr=1e-2)
        opt_l = torch.optim.AdamW(ln.parameters(), lr=1e-2)
        attach(opt_c, net)
        for step in range(4):
            batch = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(step))
            losses = []
            for model, opt in ((net, opt_c), (ln, opt_l)):
                opt.zero_grad()
                loss = model(batch, labels=batch, use_cache=False).loss
                loss.backward()
                opt.step()
                losses.append(loss.item())
            assert abs(losses[0] - losses[1]) <= 1e-10, (mode, step, losses)
        if mode == "parametrize":
            assert "transformer.h.0.attn.c_proj.weight" in net.state_dict()
            assert {w.kind for w in converted_state(net).parametrized} == {"conv1d"}


@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_trains_like_eager(mode):
    net = _net()
    x0, _ = _data()
    convert(net, (x0,), mode=mode)
    eager = copy.deepcopy(net)
    compiled = torch.compile(net, backend="eager")
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (net, eager)]
    attach(opts[0], net)
    attach(opts[1], eager)
    for step in range(3):
        x, y = _data(seed=step)
        losses = []
        for model, opt in zip((compiled, eager), opts, strict=True):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-12


def test_unparametrize_a_deepcopy_leaves_the_original_intact():
    net = _net()
    x, _ = _data()
    convert(net, (x,), mode="parametrize")
    out = net(x)
    dup = copy.deepcopy(net)
    assert unparametrize(dup) == 7
    torch.testing.assert_close(net(x), out, rtol=0, atol=0)  # the original keeps its parametrizations
    torch.testing.assert_close(dup(x), out, rtol=0, atol=1e-14)
    assert converted_state(net).parametrized and not converted_state(dup).parametrized


@pytest.mark.parametrize("shape, dim", [((5, 7), 0), ((5, 7), 1), ((3, 4, 6), 1), ((640, 512), 0)])
def test_subtract_mean_gradients_are_the_composite_ones(shape, dim):
    from torch.autograd import gradcheck, gradgradcheck

    from lightning_cbwc.centering import _SubtractMean, subtract_mean

    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(shape, dtype=torch.float64)
    (got,) = torch.autograd.grad(subtract_mean(x, dim), x, g)  # the big one takes the autograd.Function
    (ref,) = torch.autograd.grad(x - x.mean(dim, keepdim=True), x, g)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    if x.numel() < 1000:
        assert gradcheck(lambda t: _SubtractMean.apply(t, dim), (x,))
        assert gradgradcheck(lambda t: _SubtractMean.apply(t, dim), (x,))


def test_meta_device_model_converts_in_project_mode_and_is_recentered_at_attach():
    """FSDP2's deferred init: convert on the meta device (no check possible), materialize with to_empty +
    reset_parameters, and attach() re-centers the writers before the first step; parametrize is refused
    (reset_parameters would initialize the computed weight, not V)."""
    with torch.device("meta"):
        net = ResidualNet().double()
    example = torch.empty(2, 4, 6, dtype=torch.float64, device="meta")
    with pytest.raises(UnsupportedError, match="meta device: mode='parametrize'.*Use mode='project'"):
        convert(copy.deepcopy(net), (example,))
    plan = convert(net, (example,), mode="project")
    assert plan.foldable
    net.to_empty(device="cpu")
    for m in net.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    with torch.no_grad():  # a bare Parameter has no reset_parameters: to_empty left it uninitialized memory
        net.pos.normal_(0.2, 0.5)
    norm = net.get_submodule(plan.foldable[0].name)
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()
    assert max_writer_column_mean(net) > 1e-3  # reset_parameters left the writers uncentered
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    attach(opt, net)
    assert max_writer_column_mean(net) < 1e-13
    x, _ = _data()
    ln = copy.deepcopy(net)
    swap_back = {s.name for s in plan.foldable}
    for name in swap_back:  # the LayerNorm model with the same parameters computes the same function
        old = ln.get_submodule(name)
        new = nn.LayerNorm(old.normalized_shape, eps=old.eps).double()
        new.load_state_dict(old.state_dict())
        parent, _, attr = name.rpartition(".")
        setattr(ln.get_submodule(parent) if parent else ln, attr, new)
    torch.testing.assert_close(net(x), ln(x), rtol=0, atol=1e-12)
