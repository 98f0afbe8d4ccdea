"""The Lightning and Hugging Face workflows users follow: a network built in ``configure_model``, a
LightningModule without ``forward``, ``precision="64-true"``, HF models behind peft and ``torch.compile``."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from test_callback import FAST, Lit, Net, _loader
from torch import nn

from lightning_cbwc import CBWC, CBWCError
from lightning_cbwc.lightning import inputs
from lightning_cbwc.norm import RMSNorm
from lightning_cbwc.training import converted_state

MODES = ["project", "parametrize"]


def _fit(lit: pl.LightningModule, callbacks: list, steps: int = 4, **kw) -> list[float]:
    pl.Trainer(callbacks=callbacks, max_steps=steps, **{**FAST, **kw}).fit(lit, _loader())
    return lit.losses


def _same(a: list[float], b: list[float], rel: float = 1e-10) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= rel * abs(x), (a, b)


class BuiltLater(Lit):
    """The network is made in configure_model, as Lightning recommends for large models."""

    def __init__(self) -> None:
        super().__init__()
        self.model = None

    def configure_model(self) -> None:
        if self.model is None:
            self.model = Lit().model


@pytest.mark.parametrize("model_attr", ["model", None])
def test_network_built_in_configure_model_is_converted(model_attr):
    ref = _fit(BuiltLater(), [])
    lit = BuiltLater()
    got = _fit(lit, [CBWC(model_attr=model_attr)])
    assert isinstance(lit.model.norm, RMSNorm)
    _same(ref, got)


class NoForward(Lit):
    """The usual LightningModule without forward: training_step calls self.model."""

    forward = pl.LightningModule.forward

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.losses.append(loss.item())
        return loss


def test_no_forward_converts_the_single_child_holding_layernorms():
    ref = _fit(NoForward(), [])
    lit = NoForward()
    got = _fit(lit, [CBWC()])
    assert converted_state(lit.model) is not None and isinstance(lit.model.norm, RMSNorm)
    _same(ref, got)


def test_no_forward_and_two_networks_names_model_attr():
    lit = NoForward()
    lit.other = Net().double()
    with pytest.raises(CBWCError, match=r"model_attr=") as info:
        _fit(lit, [CBWC()])
    assert "\n" not in str(info.value)
    assert isinstance(lit.model.norm, nn.LayerNorm)  # nothing changed


def test_missing_model_attr_is_one_clear_line():
    with pytest.raises(CBWCError, match=r"model_attr='nope'.*no such submodule"):
        _fit(Lit(), [CBWC(model_attr="nope")])


@pytest.mark.parametrize("mode", MODES)
def test_precision_64_true_trains_like_the_float64_layernorm_run(mode):
    """The callback converts after Lightning's cast to float64, so the run is float64-exact."""
    ref = _fit(Lit(dtype="float32"), [], precision="64-true")
    lit = Lit(dtype="float32")
    got = _fit(lit, [CBWC(mode=mode, model_attr="model")], precision="64-true")
    assert lit.model.stem.weight.dtype == torch.float64 and isinstance(lit.model.norm, RMSNorm)
    assert converted_state(lit.model).max_error < 1e-12
    _same(ref, got)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("wrap", ["peft", "compile"])
def test_use_cache_is_found_through_peft_and_compile_wrappers(wrap):
    model = _gpt2()
    if wrap == "peft":
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["c_attn"]))
    else:
        model = torch.compile(model)
    ids = torch.randint(0, 40, (2, 8))
    lit = pl.LightningModule()
    args, kwargs = inputs.example_inputs(pl.Trainer(**FAST), lit, model, "fit", ids)
    assert kwargs == {"use_cache": False} and args[0] is ids


class CausalLM(pl.LightningModule):
    """A peft LoRA GPT-2 loaded with from_pretrained from a local folder (eval mode, default dropout 0.1),
    with gradient checkpointing, trained as the HF and peft docs show."""

    def __init__(self, folder) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        peft = pytest.importorskip("peft")
        base = transformers.GPT2LMHeadModel.from_pretrained(folder).double()
        assert not base.training and base.config.resid_pdrop == 0.1
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(1)
        config = peft.LoraConfig(r=2, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
        self.model = peft.get_peft_model(base, config)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def test_hf_peft_eval_base_with_gradient_checkpointing_trains_like_layernorm(tmp_path):
    base = _gpt2()
    base.config.resid_pdrop = base.config.embd_pdrop = 0.1  # the defaults
    base.save_pretrained(tmp_path / "gpt2")
    ids = torch.randint(0, 40, (8, 8), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)
    runs = []
    for callbacks in ([], [CBWC(model_attr="model", export_dir=str(tmp_path / "export"))]):
        lit = CausalLM(tmp_path / "gpt2")
        pl.Trainer(callbacks=callbacks, max_steps=4, **FAST).fit(lit, loader)
        runs.append(lit.losses)
    _same(*runs)
    state = converted_state(lit.model)
    assert len(state.plan.foldable) == 3  # Lightning keeps the base in eval mode: no dropout in training
    assert not lit.model.base_model.model.transformer.drop.training
    assert (tmp_path / "export" / "model.safetensors").exists()
    # the user turns the base's dropout on after the conversion: told once, not silently wrong
    lit.model.train()
    with pytest.warns(UserWarning, match="was in eval mode at conversion now runs in training mode"):
        lit.model(input_ids=ids[:2], use_cache=False)
