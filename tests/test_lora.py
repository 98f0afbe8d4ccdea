"""LoRA (peft) with CBWC: both orders, adapters save / reload, merge, unsupported variants."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize as P
from torch.utils.data import DataLoader, TensorDataset

from lightning_cbwc import CBWC, UnsupportedError, attach, convert
from lightning_cbwc.centering import center_, max_column_mean
from lightning_cbwc.surgery import center_writers
from lightning_cbwc.training.lora import lora_matrices, merge_and_unload, merge_lora_, prepare_
from lightning_cbwc.training.projection import max_writer_column_mean, projection_targets
from lightning_cbwc.training.state import converted_state

peft = pytest.importorskip("peft")
timm = pytest.importorskip("timm")
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model  # noqa: E402

TARGETS = ["proj", "fc2", "qkv"]  # proj also matches the patch-embedding conv: a Conv2d LoRA writer


def _vit(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=8,
        num_classes=3,
        depth=2,
        embed_dim=32,
        num_heads=2,
    ).to(dtype)


def _lora(model: nn.Module, **kw) -> PeftModel:
    torch.manual_seed(1)
    kw.setdefault("init_lora_weights", False)  # random B: a non-trivial delta from step 0
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **kw))


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)


def _lora_b(model: nn.Module) -> list[torch.Tensor]:
    """LoRA B matrices of writer layers (qkv is not a writer: its B is not centered)."""
    out = [p for n, p in model.named_parameters() if "lora_B" in n and "qkv" not in n]
    assert out
    return out


def test_peft_first_trains_like_the_layernorm_lora_model():
    x0, _ = _batch(0)
    pm = _lora(_vit())
    ln = copy.deepcopy(pm)
    plan = convert(pm, (x0,))
    center_writers(ln, plan)
    frozen = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    assert any("lora_B" in w.param for w in plan.writers)
    assert all(max_column_mean(b, 0) < 1e-14 for b in _lora_b(pm))
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (pm, ln)]
    attach(opts[0], pm)
    for step in range(5):
        x, y = _batch(10 + step)
        losses = []
        for model, opt in zip((pm, ln), opts, strict=True):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-10, (step, losses)
    assert all(max_column_mean(b, 0) < 1e-13 for b in _lora_b(pm))
    for n, p in pm.named_parameters():  # the frozen base is centered once and never touched again
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_adapters_save_and_reload(tmp_path):
    x0, _ = _batch(0)
    pm = _lora(_vit())
    convert(pm, (x0,))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    attach(opt, pm)
    for step in range(3):
        x, y = _batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(pm(x), y).backward()
        opt.step()
    pm.eval()
    x, _ = _batch(99)
    ref = pm(x)
    pm.save_pretrained(tmp_path / "adapter")

    base = _vit()  # a converted base: the same centering, then the adapter
    convert(base, (x0,))
    again = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(again(x), ref, rtol=0, atol=1e-12)
    # the vanilla LayerNorm base computes the same function with the centered adapter
    vanilla = PeftModel.from_pretrained(_vit(), tmp_path / "adapter").eval()
    torch.testing.assert_close(vanilla(x), ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("mode", ["project", "parametrize"])
def test_merge_and_unload_stays_centered_and_equal(mode):
    x0, _ = _batch(0)
    pm = _lora(_vit())
    convert(pm, (x0,), mode=mode)
    pm.eval()
    x, _ = _batch(5)
    ref = pm(x)
    merged = merge_and_unload(pm)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(x), ref, rtol=0, atol=1e-12)
    assert max_column_mean(merged.blocks[0].mlp.fc2.weight, 0) < 1e-14
    assert max_writer_column_mean(merged) < 1e-14


@pytest.mark.parametrize("peft_first", [True, False], ids=["peft_first", "parametrize_then_peft"])
def test_merge_lora_of_a_copy_of_injected_adapters(peft_first):
    """The recipes' path: a deep copy of a converted network with injected adapters (no PeftModel) is merged
    in place; the copy stays centered and equal, the original keeps its adapters and parametrizations."""
    x0, _ = _batch(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(1)
    if peft_first:
        net = inject_adapter_in_model(config, _vit())
        convert(net, (x0,))
    else:  # the wrapped bases stay parametrized: merge_lora_ removes that before peft's merge
        net = _vit()
        convert(net, (x0,), mode="parametrize")
        net = inject_adapter_in_model(config, net)
        with torch.no_grad():  # center the random B matrices of writers, as training keeps them
            for _, b, dim in lora_matrices(net):
                center_(b, dim)
    net.eval()
    x, _ = _batch(5)
    ref = net(x)
    parametrized = [n for n, m in net.named_modules() if P.is_parametrized(m)]
    assert bool(parametrized) != peft_first
    merged = merge_lora_(copy.deepcopy(net))
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert not any(P.is_parametrized(m) for m in merged.modules())
    torch.testing.assert_close(merged(x), ref, rtol=0, atol=1e-12)
    for writer in (merged.blocks[0].mlp.fc2, merged.blocks[1].attn.proj, merged.patch_embed.proj):
        assert max_column_mean(writer.weight, 0) < 1e-14  # the merged deltas are centered
    assert max_writer_column_mean(merged) < 1e-13  # writer names through a merged-away base_layer resolve
    torch.testing.assert_close(net(x), ref, rtol=0, atol=0)  # the original is untouched
    assert any("lora_" in n for n, _ in net.named_parameters())
    assert [n for n, m in net.named_modules() if P.is_parametrized(m)] == parametrized


def test_merge_lora_without_adapters_only_unparametrizes():
    x0, _ = _batch(0)
    vit = _vit()
    convert(vit, (x0,), mode="parametrize")
    vit.eval()
    x, _ = _batch(3)
    ref = vit(x)
    assert merge_lora_(vit) is vit
    assert not P.is_parametrized(vit.blocks[0].mlp.fc2)
    assert converted_state(vit).parametrized == []
    torch.testing.assert_close(vit(x), ref, rtol=0, atol=1e-12)


def test_peft_after_convert_parametrize_then_train_and_merge():
    x0, _ = _batch(0)
    vit = _vit()
    convert(vit, (x0,), mode="parametrize")
    assert P.is_parametrized(vit.blocks[0].mlp.fc2, "weight")
    pm = _lora(vit, init_lora_weights=True)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    attach(opt, pm)  # runs prepare_: the wrapped bases lose their parametrization
    assert not P.is_parametrized(vit.blocks[0].mlp.fc2.base_layer, "weight")
    assert prepare_(pm) == 0  # idempotent
    names = [t.name for t in projection_targets(pm)]
    assert "base_model.model.blocks.0.mlp.fc2.lora_B.default.weight" in names
    for step in range(3):
        x, y = _batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(pm(x), y).backward()
        opt.step()
    assert all(b.abs().max() > 0 and max_column_mean(b, 0) < 1e-13 for b in _lora_b(pm))
    pm.eval()
    x, _ = _batch(7)
    ref = pm(x)
    merged = pm.merge_and_unload()  # peft's own merge is safe after prepare_
    torch.testing.assert_close(merged(x), ref, rtol=0, atol=1e-12)
    assert max_writer_column_mean(merged) < 1e-13


def test_embedding_lora_after_convert_is_projected():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_layer=1,
        n_embd=16,
        n_head=2,
        vocab_size=40,
        n_positions=8,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    )
    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(cfg).double()
    ids = torch.randint(0, 40, (2, 8))
    convert(gpt, (ids,), {"use_cache": False})
    pm = get_peft_model(gpt, LoraConfig(r=2, target_modules=["wpe"], init_lora_weights=False))
    prepare_(pm)
    targets = {t.name: t for t in projection_targets(pm)}
    name = "base_model.model.transformer.wpe.lora_embedding_B.default"
    assert name in targets and targets[name].dim == 0
    assert max_column_mean(targets[name].tensor, 0) < 1e-14


@pytest.mark.parametrize(
    "kw", [{"use_dora": True}, {"init_lora_weights": "pissa"}, {"init_lora_weights": "olora"}]
)
def test_dora_and_base_modifying_inits_are_refused(kw):
    x0, _ = _batch(0)
    pm = get_peft_model(_vit(dtype=torch.float32), LoraConfig(r=2, target_modules=["fc2"], **kw))
    with pytest.raises(UnsupportedError, match="DoRA|rewrites the base weights"):
        convert(pm, (x0.float(),))
    assert isinstance(pm.base_model.model.norm, nn.LayerNorm)


def test_dora_added_after_convert_is_refused_at_prepare():
    x0, _ = _batch(0)
    vit = _vit()
    convert(vit, (x0,))
    pm = get_peft_model(vit, LoraConfig(r=2, target_modules=["fc2"], use_dora=True))
    with pytest.raises(UnsupportedError, match="DoRA"):
        prepare_(pm)


class LoraLit(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = _lora(_vit())  # the usual order: peft in __init__, the callback converts at setup

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def test_callback_with_peft_model(tmp_path):
    xs = torch.cat([_batch(i)[0] for i in range(2)])
    ys = torch.cat([_batch(i)[1] for i in range(2)])
    lit = LoraLit()
    pl.Trainer(
        callbacks=[CBWC(model_attr="model")],
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(lit, DataLoader(TensorDataset(xs, ys), batch_size=4))
    assert converted_state(lit.model) is not None
    assert all(max_column_mean(b, 0) < 1e-13 for b in _lora_b(lit.model))
    lit.model.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()
