"""CBWC training follows the LayerNorm model's trajectory exactly (float64, loss per step and final outputs on
fresh inputs), for every optimizer and loop: or the site stays LayerNorm with a reason, never a silent mismatch.

The reference is always the user's own, unconverted LayerNorm model trained the same way (same batches, same
dropout masks)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_biases, randomize_named, randomize_norm_affine
from torch import nn

from lightning_cbwc.centering import CenteredEmbedding, max_column_mean
from lightning_cbwc.norm import RMSNorm
from lightning_cbwc.training import attach, convert, converted_state, unparametrize
from lightning_cbwc.training.projection import max_writer_column_mean

MODES = ["project", "parametrize"]
TOKENS, VOCAB, N_OUT = 5, 11, 3
REL = 1e-10


class Block(nn.Module):
    def __init__(self, d: int, p: float, layer_scale: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.drop = nn.Dropout(p)
        self.gamma = nn.Parameter(torch.full((d,), 0.3)) if layer_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.fc2(F.gelu(self.fc1(self.norm(x)))))
        return x + (h if self.gamma is None else self.gamma * h)


class StreamNet(nn.Module):
    """Token table + position table + pre-LN blocks (dropout before the residual add, optional LayerScale)
    + final LayerNorm + head: every writer kind the stream has (embedding, parameter, linear)."""

    def __init__(self, d: int = 16, depth: int = 2, p: float = 0.0, layer_scale: bool = False, sparse=False):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d, sparse=sparse)
        self.pos = nn.Parameter(torch.randn(TOKENS, d) * 0.5)
        self.blocks = nn.ModuleList(Block(d, p, layer_scale) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, N_OUT)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))


def stream_net(**kw) -> StreamNet:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    net = StreamNet(**kw).double()
    randomize_norm_affine(net, generator=g)
    randomize_biases(net, std=0.3, generator=g)
    randomize_named(net, "gamma", 0.3, 0.1, generator=g)
    return net


def batch(step: int, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (n, TOKENS), generator=g), torch.randint(0, N_OUT, (n,), generator=g)


def train(model: nn.Module, make_opts, steps: int = 6, clip: str | None = None, mode: str | None = None):
    """Losses per step and the eval output on a fresh batch of another size; converts first when ``mode``."""
    if mode is not None:
        convert(model, (batch(0)[0],), mode=mode)
    opts = make_opts(model)
    if mode is not None:
        for opt in opts:
            attach(opt, model)
    losses = []
    model.train()
    for step in range(steps):
        ids, y = batch(step)
        torch.manual_seed(1000 + step)  # the same dropout masks in both runs

        def closure(ids=ids, y=y):
            for opt in opts:
                opt.zero_grad()
            loss = F.cross_entropy(model(ids), y)
            loss.backward()
            if clip == "norm":
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            elif clip == "value":
                torch.nn.utils.clip_grad_value_(model.parameters(), 0.002)
            return loss

        if isinstance(opts[0], torch.optim.LBFGS):
            losses.append(float(opts[0].step(closure)))
        else:
            losses.append(float(closure().detach()))
            for opt in opts:
                opt.step()
    model.eval()
    with torch.no_grad():
        out = model(batch(99, n=9)[0])
    return losses, out


def assert_same_training(ref, got) -> None:
    (ref_losses, ref_out), (losses, out) = ref, got
    for step, (a, b) in enumerate(zip(ref_losses, losses, strict=True)):
        assert abs(a - b) <= REL * abs(a), (step, a, b)
    assert float((out - ref_out).abs().max() / ref_out.abs().max()) <= REL


def one(opt_cls, **kw):
    return lambda model: [opt_cls(model.parameters(), **kw)]


#: optimizer and loop configurations, each exact in the given modes
CASES = {
    "sgd_momentum_nesterov_decay": (
        one(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
        MODES,
    ),
    "adamw": (one(torch.optim.AdamW, lr=1e-2, weight_decay=0.1), MODES),
    "adam_amsgrad": (one(torch.optim.Adam, lr=1e-2, amsgrad=True), MODES),
    "rmsprop": (one(torch.optim.RMSprop, lr=1e-3), MODES),
    "lbfgs": (one(torch.optim.LBFGS, lr=0.1, max_iter=3), MODES),
    "adam_coupled_l2": (one(torch.optim.Adam, lr=1e-2, weight_decay=0.1), ["parametrize"]),
    "adagrad_coupled_l2": (one(torch.optim.Adagrad, lr=1e-2, weight_decay=0.1), ["parametrize"]),
    "adafactor": (one(torch.optim.Adafactor, lr=1e-2), ["parametrize"]),
}


@pytest.mark.parametrize(
    "case, mode", [(c, m) for c, (_, modes) in CASES.items() for m in modes], ids=lambda v: str(v)
)
def test_training_equals_layernorm_training(case, mode):
    make_opts, _ = CASES[case]
    ref = train(stream_net(), make_opts)
    net = stream_net()
    got = train(net, make_opts, mode=mode)
    assert len(converted_state(net).plan.foldable) == 3
    assert_same_training(ref, got)
    assert max_writer_column_mean(net) < 1e-13


@pytest.mark.parametrize("mode", MODES)
def test_token_table_is_centered_at_the_lookup_and_trains_as_the_layernorm_models(mode):
    """In both modes the trainable table is centered at the lookup, not re-centered after each step (a pass
    over the looked-up rows instead of the whole vocabulary): after AdamW steps it is the LayerNorm model's own
    table, uncentered (float64)."""
    make_opts = one(torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    ref_net, net = stream_net(), stream_net()
    ref = train(ref_net, make_opts)
    got = train(net, make_opts, mode=mode)
    assert_same_training(ref, got)
    state = converted_state(net)
    assert isinstance(net.emb, CenteredEmbedding)
    assert "emb.weight" not in {w.param for w in state.projected + state.parametrized}
    torch.testing.assert_close(net.emb.weight, ref_net.emb.weight, rtol=1e-10, atol=1e-12)
    assert max_column_mean(net.emb.weight, 1) > 1e-2  # the table itself was never centered


def test_parametrized_linear_centers_its_output_when_it_sees_fewer_rows_than_inputs(monkeypatch):
    """fc2 (32 inputs) centers its output for a 1 x 5-token batch and its weight for a 9 x 5 one: the same
    function and V gradients as the LayerNorm model either way, a user's hook on it sees the centered output,
    a forward that raises leaves the weight centered, and unparametrize removes the hooks."""
    from lightning_cbwc.training import parametrize as par

    calls: list[tuple[int, ...]] = []
    real = par.subtract_mean
    monkeypatch.setattr(par, "subtract_mean", lambda x, *a: calls.append(tuple(x.shape)) or real(x, *a))
    ref, net = stream_net(), stream_net()
    convert(net, (batch(0)[0],), mode="parametrize")
    fc2 = net.blocks[0].fc2
    seen = []
    fc2.register_forward_hook(lambda m, args, out: seen.append(out.detach()))
    for n, weight_centered in ((1, False), (9, True)):
        ids, y = batch(7, n=n)
        calls.clear()
        for model in (ref, net):
            model.zero_grad()
            F.cross_entropy(model(ids), y).backward()
        assert ((16, 32) in calls) is weight_centered, (n, calls)  # fc2's weight (out 16, in 32)
        assert seen[-1].mean(-1).abs().max() < 1e-12 * seen[-1].abs().max()
        for name, p in ref.named_parameters():
            got = dict(net.named_parameters()).get(name)
            if got is None:  # parametrized: the original V
                mod, _, attr = name.rpartition(".")
                got = net.get_submodule(mod).parametrizations[attr].original
            torch.testing.assert_close(got.grad, p.grad, rtol=1e-10, atol=1e-13, msg=f"{n}: {name}")
    with pytest.raises(RuntimeError):
        fc2(torch.zeros(2, 32, dtype=torch.float32))  # few rows, wrong dtype: F.linear raises
    assert max_column_mean(fc2.weight, 0) < 1e-13  # passthrough was reset
    compiled = torch.compile(net, backend="eager")  # dynamo traces the hooks and the flags they set
    for n in (1, 9):
        ids = batch(8, n=n)[0]
        torch.testing.assert_close(compiled(ids), ref(ids), rtol=1e-10, atol=1e-13)
    assert max_column_mean(fc2.weight, 0) < 1e-13
    unparametrize(net)
    assert not any(getattr(h, "__module__", "") == par.__name__ for h in fc2._forward_pre_hooks.values())
    assert not any(getattr(h, "__module__", "") == par.__name__ for h in fc2._forward_hooks.values())


@pytest.mark.parametrize("opt", ["adam_coupled_l2", "adagrad_coupled_l2", "adafactor"])
def test_project_mode_says_when_the_optimizer_makes_it_inexact(opt):
    net = stream_net()
    convert(net, (batch(0)[0],), mode="project")
    (optimizer,) = CASES[opt][0](net)
    with pytest.warns(UserWarning, match="not follow the LayerNorm model exactly.*parametrize"):
        attach(optimizer, net)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clip", ["norm", "value"])
def test_clipping_before_step_in_a_plain_loop(mode, clip):
    make_opts = one(torch.optim.Adam, lr=1e-2)
    ref = train(stream_net(), make_opts, clip=clip)
    got = train(stream_net(), make_opts, clip=clip, mode=mode)
    assert_same_training(ref, got)


@pytest.mark.parametrize("mode", MODES)
def test_sparse_adam_on_a_sparse_embedding(mode):
    def make_opts(model):
        table = [p for n, p in model.named_parameters() if n.startswith("emb.")]
        rest = [p for n, p in model.named_parameters() if not n.startswith("emb.")]
        return [torch.optim.SparseAdam(table, lr=1e-2), torch.optim.Adam(rest, lr=1e-2)]

    ref = train(stream_net(sparse=True), make_opts)
    net = stream_net(sparse=True)
    got = train(net, make_opts, mode=mode)
    assert_same_training(ref, got)
    assert max_writer_column_mean(net) < 1e-13


@pytest.mark.parametrize("mode", MODES)
def test_dropout_before_the_norm_keeps_layernorm_for_training_and_folds_at_export(mode, tmp_path):
    make_opts = one(torch.optim.Adam, lr=1e-2)
    ref = train(stream_net(p=0.2), make_opts)
    net = stream_net(p=0.2)
    got = train(net, make_opts, mode=mode)
    assert_same_training(ref, got)
    state = converted_state(net)
    # block 0's norm reads emb + pos (no dropout); the dropout of each block reaches the next norm
    assert [s.name for s in state.plan.foldable] == ["blocks.0.norm"]
    assert state.inference_only == ["blocks.1.norm", "norm"]
    reason = state.plan["norm"].reason
    assert "exact at inference only" in reason and "dropout (p=0.2)" in reason and "blocks.0.drop" in reason
    assert isinstance(net.norm, nn.LayerNorm) and isinstance(net.blocks[0].norm, RMSNorm)

    from lightning_cbwc.export.load import load_folded
    from lightning_cbwc.export.trained import export_trained

    ids = batch(0)[0]
    export_trained(net, tmp_path, example=((ids,), {}))
    loaded = load_folded(tmp_path, stream_net(p=0.2))
    assert not any(isinstance(m, nn.LayerNorm) for m in loaded.modules())  # all three folded
    fresh = batch(50, n=7)[0]
    with torch.no_grad():
        ref_out, out = net.eval()(fresh), loaded.eval()(fresh)
    assert float((out - ref_out).abs().max() / ref_out.abs().max()) <= REL


@pytest.mark.parametrize("mode", MODES)
def test_layerscale_trains_exactly(mode):
    make_opts = one(torch.optim.Adam, lr=1e-2)
    ref = train(stream_net(layer_scale=True), make_opts)
    net = stream_net(layer_scale=True)
    got = train(net, make_opts, mode=mode)
    assert_same_training(ref, got)
    state = converted_state(net)
    assert state.layer_scales == ["blocks.0.gamma", "blocks.1.gamma"] and net.blocks[0].gamma.requires_grad
    assert not torch.allclose(net.blocks[0].gamma, torch.full_like(net.blocks[0].gamma, 0.3))  # it trained


@pytest.mark.parametrize("mode", MODES)
def test_parametrize_checkpoint_is_the_layernorm_models_and_resume_is_exact(mode):
    make_opts = one(torch.optim.Adam, lr=1e-2, weight_decay=0.05)
    net = stream_net()
    train(net, make_opts, steps=3, mode="parametrize")
    vanilla = stream_net()
    vanilla.load_state_dict(net.state_dict(), strict=True)
    fresh = batch(60, n=7)[0]
    with torch.no_grad():
        a, b = net.eval()(fresh), vanilla.eval()(fresh)
    assert float((a - b).abs().max() / b.abs().max()) <= REL
    if mode == "parametrize":  # V itself: the tensors are the LayerNorm model's, bit for bit
        assert set(net.state_dict()) == set(vanilla.state_dict())

    # resume: 3 steps, save, load into a new converted model, 3 more == 6 uninterrupted
    def run(steps_a: int, steps_b: int):
        model = stream_net()
        convert(model, (batch(0)[0],), mode=mode)
        (opt,) = make_opts(model)
        attach(opt, model)
        for step in range(steps_a):
            opt.zero_grad()
            ids, y = batch(step)
            F.cross_entropy(model(ids), y).backward()
            opt.step()
        if not steps_b:
            return model
        saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
        model = stream_net()
        convert(model, (batch(0)[0],), mode=mode)
        (opt,) = make_opts(model)
        attach(opt, model)
        model.load_state_dict(saved[0], strict=True)
        opt.load_state_dict(saved[1])
        for step in range(steps_a, steps_a + steps_b):
            opt.zero_grad()
            ids, y = batch(step)
            F.cross_entropy(model(ids), y).backward()
            opt.step()
        return model

    whole, resumed = run(6, 0), run(3, 3)
    for (k, v), (k2, v2) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k


def _timm_vit(**kw):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=8,
        embed_dim=24,
        depth=2,
        num_heads=2,
        num_classes=N_OUT,
        **kw,
    ).double()
    g = torch.Generator().manual_seed(1)
    randomize_norm_affine(model, generator=g)
    randomize_biases(model, std=0.1, generator=g)
    randomize_named(model, "gamma", 0.1, 0.05, generator=g)
    return model


def _train_vit(model, mode, weight_decay, steps=4):
    """Adam on random images; converts first when ``mode``; losses and the eval output on fresh images."""
    g = torch.Generator().manual_seed(5)
    xs = torch.randn(steps, 3, 3, 16, 16, generator=g, dtype=torch.float64)
    ys = torch.randint(0, N_OUT, (steps, 3), generator=g)
    if mode is not None:
        convert(model, (xs[0],), mode=mode)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=weight_decay)
    if mode is not None:
        attach(opt, model)
    model.train()
    losses = []
    for step in range(steps):
        torch.manual_seed(2000 + step)  # the same drop-path draws in both runs
        opt.zero_grad()
        loss = F.cross_entropy(model(xs[step]), ys[step])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(5, 3, 16, 16, generator=g, dtype=torch.float64))
    return losses, out


@pytest.mark.parametrize("mode", MODES)
def test_timm_vit_with_layerscale_and_drop_path_trains_exactly(mode):
    """timm's LayerScale (init_values) keeps training, and per-sample drop-path keeps every site exact
    (coupled L2 decay in parametrize mode, where it is exact)."""
    kw = {"init_values": 0.1, "drop_path_rate": 0.2}
    decay = 0.01 if mode == "parametrize" else 0.0
    model = _timm_vit(**kw)
    got = _train_vit(model, mode, decay)
    state = converted_state(model)
    assert len(state.plan.foldable) == len(state.plan.sites) == 5 and not state.inference_only
    assert len(state.layer_scales) == 4
    assert_same_training(_train_vit(_timm_vit(**kw), None, decay), got)


def test_hf_gpt2_with_default_dropout_keeps_layernorm_for_training():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    assert cfg.resid_pdrop == cfg.embd_pdrop == 0.1  # the defaults users train with
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double()
    ref_model = copy.deepcopy(model)
    ids = torch.randint(0, 40, (2, 8))
    with pytest.warns(UserWarning, match="exact at inference only.*dropout"):
        plan = convert(model, (), {"input_ids": ids, "use_cache": False})
    assert not plan.foldable and len(converted_state(model).inference_only) == 5
    assert not any(isinstance(m, RMSNorm) for m in model.modules())
    losses = []
    for m in (ref_model, model):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        m.train()
        run = []
        for step in range(3):
            torch.manual_seed(step)
            opt.zero_grad()
            loss = m(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            run.append(float(loss.detach()))
        losses.append(run)
    assert losses[0] == losses[1]


def _lightning_runs(cls, mode: str, steps: int, **trainer_kw) -> tuple[list, list, object]:
    """Losses of a LayerNorm fit and of a CBWC fit of ``cls()`` on ``steps`` batches, and the CBWC module."""
    import lightning.pytorch as pl

    from lightning_cbwc import CBWC

    ids, ys = zip(*(batch(step) for step in range(steps)), strict=True)
    data = torch.utils.data.TensorDataset(torch.cat(ids), torch.cat(ys))
    loader = torch.utils.data.DataLoader(data, batch_size=6, shuffle=False)
    runs = []
    for callbacks in ([], [CBWC(mode=mode, model_attr="net")]):
        lit = cls()
        quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False)
        pl.Trainer(
            callbacks=callbacks, enable_model_summary=False, accelerator="cpu", **quiet, **trainer_kw
        ).fit(lit, loader)
        runs.append(lit.losses)
    return runs[0], runs[1], lit


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_lightning_manual_optimization_with_clip_gradients(mode, algorithm):
    """``self.clip_gradients`` runs before the step (and before any step hook): it sees centered gradients."""
    import lightning.pytorch as pl

    class Manual(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = stream_net(p=0.0)
            self.automatic_optimization = False
            self.losses = []

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            ids, y = batch
            loss = F.cross_entropy(self.net(ids), y)
            self.manual_backward(loss)
            self.clip_gradients(opt, gradient_clip_val=0.05, gradient_clip_algorithm=algorithm)
            opt.step()
            self.losses.append(float(loss.detach()))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    runs = _lightning_runs(Manual, mode, steps=5, max_steps=5)
    assert isinstance(runs[2].net.norm, RMSNorm) and len(runs[0]) == 5
    for a, b in zip(runs[0], runs[1], strict=True):
        assert abs(a - b) <= REL * abs(a)


@pytest.mark.parametrize("mode", MODES)
def test_lightning_automatic_optimization_with_clipping_and_accumulation(mode):
    """Trainer(gradient_clip_val=..., accumulate_grad_batches=2): the same losses as the LayerNorm run."""
    import lightning.pytorch as pl

    class Auto(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = stream_net(p=0.0)
            self.losses = []

        def training_step(self, batch, batch_idx):
            ids, y = batch
            loss = F.cross_entropy(self.net(ids), y)
            self.losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(
                self.parameters(), lr=1e-2, weight_decay=0.01 if mode == "parametrize" else 0
            )

    runs = _lightning_runs(
        Auto, mode, steps=6, max_epochs=1, gradient_clip_val=0.05, accumulate_grad_batches=2
    )
    assert len(runs[0]) == 6
    for a, b in zip(runs[0], runs[1], strict=True):
        assert abs(a - b) <= REL * abs(a)
