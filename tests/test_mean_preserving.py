"""Ops that keep a zero mean without being writers: permutations and copies of whole fibres (flip, roll,
repeat, self-cat), sums over other dims (cumsum over tokens), row selection along other dims (index_select,
gather with whole-row indices, interpolation of a position grid), and an explicit ``h - h.mean(-1)``.
Each folds, exactly in float64 on fresh inputs of other sizes; the look-alikes that do not keep the mean
keep their LayerNorm with the reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_equivalent, randomize_biases, randomize_norm_affine
from torch import nn

import lightning_cbwc

D = 8


def _prepared(model: nn.Module) -> nn.Module:
    model = model.double().eval()
    randomize_norm_affine(model)
    randomize_biases(model, std=0.1)
    return model


def _tokens(batch: int = 3, seq: int = 5) -> tuple:
    return (torch.randn(batch, seq, D, dtype=torch.float64),)


def _centered(g: torch.Tensor, dim: int) -> torch.Tensor:
    return g - g.mean(dim, keepdim=True)


class Stream(nn.Module):
    """fc -> op -> LayerNorm, the op given as a function of the written stream."""

    def __init__(self, op, width: int = D) -> None:
        super().__init__()
        self.op = op
        self.fc = nn.Linear(D, D)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.op(self.fc(x)))


FOLDING = {
    "flip_features": (lambda h: torch.flip(h, [-1]), D),
    "flip_tokens": (lambda h: torch.flip(h, [1]), D),
    "roll_features": (lambda h: torch.roll(h, 3, -1), D),
    "repeat_features": (lambda h: h.repeat(1, 1, 2), 2 * D),
    "self_cat_features": (lambda h: torch.cat([h, h], -1), 2 * D),
    "cumsum_tokens": (lambda h: h.cumsum(1), D),
    "explicit_centering": (lambda h: _centered(F.gelu(h), -1), D),
}


@pytest.mark.parametrize("name", list(FOLDING))
def test_mean_preserving_op_folds_exactly(name: str) -> None:
    op, width = FOLDING[name]
    model = _prepared(Stream(op, width))
    plan = lightning_cbwc.analyze(model, _tokens())
    assert plan["norm"].foldable, plan["norm"].reason
    folded = lightning_cbwc.fold(model, _tokens())
    assert isinstance(folded.norm, lightning_cbwc.RMSNorm)
    assert_equivalent(model, folded, lambda: _tokens(2, 7), tol=1e-10, trials=2)


NOT_FOLDING = {
    "cumsum_features": (lambda h: h.cumsum(-1), D, "cumulatively"),
    "roll_flattened": (lambda h: torch.roll(h, 3), D, "flattened"),
    "cat_with_other": (lambda h: torch.cat([h, 2 * h], -1), 2 * D, "uniform"),
    "centering_other_dim": (lambda h: _centered(F.gelu(h), 1), D, "normalizes over dims [2]"),
}


@pytest.mark.parametrize("name", list(NOT_FOLDING))
def test_look_alikes_keep_their_layer_norm(name: str) -> None:
    op, width, why = NOT_FOLDING[name]
    model = _prepared(Stream(op, width))
    site = lightning_cbwc.analyze(model, _tokens())["norm"]
    assert not site.foldable and why in site.reason, site.reason
    folded = lightning_cbwc.fold(model, _tokens())
    assert_equivalent(model, folded, lambda: _tokens(2, 7), tol=1e-10, trials=1)


class PositionRows(nn.Module):
    """Tokens plus position rows picked from a table (index_select), then whole tokens picked (gather)."""

    def __init__(self, select: str) -> None:
        super().__init__()
        self.select = select
        self.fc = nn.Linear(D, D)
        self.pos = nn.Parameter(torch.randn(16, D))
        self.norm = nn.LayerNorm(D)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        rows = self.pos.index_select(0, torch.arange(x.shape[1], device=x.device) + 2)
        h = self.fc(x) + rows
        if self.select == "rows":
            h = torch.gather(h, 1, keep.unsqueeze(-1).expand(-1, -1, D))  # ViT-MAE's kept tokens
        else:
            h = torch.gather(h, 2, keep.unsqueeze(1).expand(-1, h.shape[1], -1))  # mixes features
        return self.norm(h)


def _with_keep(batch: int, seq: int, keep: int, high: int) -> tuple:
    x = _tokens(batch, seq)[0]
    return (x, torch.stack([torch.randperm(high)[:keep] for _ in range(batch)]))


def test_index_select_and_whole_row_gather_fold_exactly() -> None:
    model = _prepared(PositionRows("rows"))
    plan = lightning_cbwc.analyze(model, _with_keep(3, 6, 4, 6))
    assert plan["norm"].foldable, plan["norm"].reason
    assert {w.param for w in plan["norm"].writers} >= {"fc.weight", "pos"}
    folded = lightning_cbwc.fold(model, _with_keep(3, 6, 4, 6))
    assert_equivalent(model, folded, lambda: _with_keep(2, 9, 5, 9), tol=1e-10, trials=2)


def test_gather_across_features_keeps_its_layer_norm() -> None:
    model = _prepared(PositionRows("features"))
    site = lightning_cbwc.analyze(model, _with_keep(3, 6, D, D))["norm"]
    assert not site.foldable and "gathers" in site.reason, site.reason


class InterpolatedGrid(nn.Module):
    """A conv patch stem plus a position grid resized to the image (YOLOS, DeiT at another resolution)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.proj = nn.Conv2d(3, D, 4, stride=4)
        self.grid = nn.Parameter(torch.randn(1, D, 3, 3))
        self.norm = nn.LayerNorm(D)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h = self.proj(img)
        kw = {} if self.mode == "nearest" else {"align_corners": False}
        h = h + F.interpolate(self.grid, size=h.shape[-2:], mode=self.mode, **kw)
        return self.norm(h.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
def test_interpolated_position_grid_folds_exactly(mode: str) -> None:
    model = _prepared(InterpolatedGrid(mode))

    def images(size: int = 16) -> tuple:
        return (torch.randn(2, 3, size, size, dtype=torch.float64),)

    plan = lightning_cbwc.analyze(model, images())
    assert plan["norm"].foldable, plan["norm"].reason
    assert "grid" in {w.param for w in plan["norm"].writers}
    folded = lightning_cbwc.fold(model, images())
    assert_equivalent(model, folded, lambda: images(16), tol=1e-10, trials=2)
