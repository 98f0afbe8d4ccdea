"""convert(..., replace="all") / CBWC(replace="all"): every LayerNorm becomes RMSNorm; each site is exact or
approximate with its reason; the exact ones still compute LayerNorm's function (float64, fresh inputs)."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_biases, randomize_norm_affine
from torch import nn

from lightning_cbwc import CBWC, FoldPlan, analyze, convert
from lightning_cbwc.errors import CBWCError
from lightning_cbwc.norm import RMSNorm, RMSNorm2d
from lightning_cbwc.training.state import converted_state


def _swin() -> nn.Module:
    import timm

    # Swin-T's blocks (shifted windows, patch merging), fewer and narrower
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=56,
        embed_dim=24,
        depths=(1, 1, 2, 1),
        num_heads=(1, 1, 2, 2),
        num_classes=5,
    )


def _convnext() -> nn.Module:
    import timm

    model = timm.create_model("convnext_atto", pretrained=False, num_classes=5)
    for name, p in model.named_parameters():  # LayerScales of 1e-6 would hide what the swaps change
        if name.endswith(".gamma"):
            nn.init.uniform_(p, 0.5, 1.5)
    return model


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(cfg)


def _images(batch: int, size: int, seed: int) -> tuple:
    return (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)),)


def _ids(batch: int, seq: int, seed: int) -> tuple:
    return (torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


CASES = {
    # name: (factory, example inputs, fresh inputs of another batch / size)
    "swin": (_swin, _images(2, 56, 0), _images(3, 56, 1)),
    "convnext": (_convnext, _images(2, 64, 0), _images(3, 96, 1)),
    "bert": (_bert, _ids(2, 9, 0), _ids(3, 17, 1)),
}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = CASES[name][0]()
    g = torch.Generator().manual_seed(0)
    randomize_norm_affine(model, generator=g)
    randomize_biases(model, generator=g)
    return model.double()


def _double(inputs: tuple) -> tuple:
    return tuple(t.double() if t.is_floating_point() else t for t in inputs)


def _layer_norm_gaps(model: nn.Module, sites: list[str], inputs: tuple) -> dict[str, tuple[float, float]]:
    """Per site: (|mean| / RMS of its input, max |RMSNorm - LayerNorm| on that input), from hooks of the test."""
    out: dict[str, tuple[float, float]] = {}

    def hook(name: str, norm: nn.Module, args: tuple, y: torch.Tensor) -> None:
        x = args[0]
        if isinstance(norm, RMSNorm2d):
            x, y = x.movedim(1, -1), y.movedim(1, -1)
        dims = tuple(range(-len(norm.normalized_shape), 0))
        ratio = float((x.mean(dims).abs() / x.pow(2).mean(dims).sqrt()).max())
        ref = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        out[name] = (ratio, float((y - ref).abs().max() / ref.pow(2).mean().sqrt()))

    handles = [
        model.get_submodule(s).register_forward_hook(lambda m, a, y, s=s: hook(s, m, a, y)) for s in sites
    ]
    with torch.no_grad():
        model.eval()(*inputs)
    for h in handles:
        h.remove()
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_replace_all_swaps_every_layer_norm(name: str) -> None:
    model = _model(name)
    _, example, fresh = CASES[name]
    example, fresh = _double(example), _double(fresh)
    exact_by_default = {s.name for s in analyze(copy.deepcopy(model).eval(), example).foldable}

    plan = convert(model.train(), example, replace="all")

    assert not [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    assert {s.verdict for s in plan.sites} <= {"exact", "approximate"}
    assert plan.approximate and plan.foldable  # each model has both kinds
    assert all(s.reason for s in plan.approximate) and all(s.writers for s in plan.foldable)
    assert exact_by_default <= {s.name for s in plan.foldable}
    assert all(isinstance(model.get_submodule(s.name), RMSNorm) for s in plan.sites)
    # only exact sites promise a zero-mean input (LayerNorm's backward; F.layer_norm without the kernel)
    assert all(model.get_submodule(s.name).centered_input == (s.verdict == "exact") for s in plan.sites)
    assert "approximate" in str(plan) and "swapped approximately" in plan.summary()
    assert FoldPlan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()

    gaps = _layer_norm_gaps(model, [s.name for s in plan.sites], fresh)
    for site in plan.foldable:  # exact: zero-mean input, LayerNorm's output, on inputs it was not built on
        ratio, gap = gaps[site.name]
        assert ratio < 1e-12 and gap < 1e-12, (site.name, ratio, gap)
    assert max(gaps[s.name][0] for s in plan.approximate) > 1e-3  # approximate sites are not LayerNorm
    state = converted_state(model)
    assert state.replace == "all" and state.max_error < 1e-12 and state.step0_change > 1e-6


def test_replace_all_marks_dropout_sites_approximate_keeping_their_writers() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.drop, self.norm, self.head = (
                nn.Linear(8, 8),
                nn.Dropout(0.5),
                nn.LayerNorm(8),
                nn.Linear(8, 2),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(self.drop(self.fc(x))))

    x = torch.randn(4, 8, dtype=torch.float64)
    with pytest.warns(UserWarning, match="nothing to convert"):
        default = convert(Block().double().train(), x)
    assert default["norm"].verdict == "kept"
    model = Block().double().train()
    plan = convert(model, x, replace="all")
    site = plan["norm"]
    assert site.verdict == "approximate" and "exact at inference only" in site.reason and site.writers
    gaps = _layer_norm_gaps(model, ["norm"], (torch.randn(5, 8, dtype=torch.float64),))
    assert gaps["norm"][1] < 1e-12  # eval: the dropout is off and the site is exact


def test_replace_all_conflicting_settings() -> None:
    model, x = _model("convnext"), _double(CASES["convnext"][1])
    convert(model, x, replace="all", check=False)
    with pytest.warns(UserWarning, match="replace='all'"):
        convert(model, x)
    with pytest.raises(ValueError, match="replace must be one of"):
        convert(_model("convnext"), x, replace="approximate")
    cb = CBWC(replace="all")
    with pytest.raises(CBWCError, match=r"replace='foldable'.*Resume with CBWC\(replace='foldable'\)"):
        cb.load_state_dict({"mode": "parametrize", "replace": "foldable"})


class _Classifier(pl.LightningModule):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.model = CASES[name][0]()

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self.model(x)
        logits = out.last_hidden_state.mean(1)[:, :5] if self.name == "bert" else out
        return F.cross_entropy(logits, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _loader(name: str) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = (
        torch.randint(0, 100, (8, 9), generator=g)
        if name == "bert"
        else torch.randn(8, 3, 32, 32, generator=g)
    )
    data = torch.utils.data.TensorDataset(x, torch.randint(0, 5, (8,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=4)


@pytest.mark.parametrize("replace", ["foldable", "all"])
@pytest.mark.parametrize("name", ["convnext", "bert"])
def test_callback_trains_and_logs_each_approximate_site(tmp_path: Path, name: str, replace: str) -> None:
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    lit = _Classifier(name)
    csv = CSVLogger(tmp_path, name="run")
    trainer = pl.Trainer(
        callbacks=[CBWC(model_attr="model", replace=replace)],
        max_steps=2,
        log_every_n_steps=1,
        logger=csv,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(lit, _loader(name))
    state = converted_state(lit.model)
    header = (Path(csv.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    logged = {
        h.removeprefix("cbwc/input_mean_ratio/") for h in header if h.startswith("cbwc/input_mean_ratio/")
    }
    hparams = (Path(csv.log_dir) / "hparams.yaml").read_text()
    if replace == "all":
        assert not [m for m in lit.model.modules() if isinstance(m, nn.LayerNorm)]
        assert logged == {f"model.{s.name}" for s in state.plan.approximate} and logged
        assert "cbwc/step0_change" in hparams and "cbwc/approximate" in hparams
    else:
        assert not logged and not state.plan.approximate and "cbwc/step0_change" not in hparams
    assert "cbwc/max_input_mean_ratio" in header


def test_replace_all_export_reloads(tmp_path: Path) -> None:
    from lightning_cbwc import load_folded
    from lightning_cbwc.export import export

    model = _model("convnext").float()
    example, fresh = CASES["convnext"][1], CASES["convnext"][2]
    convert(model.train(), example, replace="all")
    result = export(model, tmp_path, "safetensors", example)
    assert result.ok
    loaded = load_folded(tmp_path)
    assert not [m for m in loaded.modules() if isinstance(m, nn.LayerNorm)]
    with torch.no_grad():
        truth = copy.deepcopy(model).double().eval()(*_double(fresh))
        own = model.eval()(*fresh)
        got = loaded.eval()(*fresh)

    def rel(a: torch.Tensor) -> float:
        return float((a.double() - truth).abs().max() / truth.pow(2).mean().sqrt())

    assert rel(got) <= 2 * rel(own) + 1e-6
