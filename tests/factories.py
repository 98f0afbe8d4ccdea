"""Small model factories for ``pkg.module:factory`` specs in the tests (``tests.factories:tiny_ln_mlp``)."""

from __future__ import annotations

import torch
from torch import nn


class TinyLNMLP(nn.Module):
    """Linear -> LayerNorm -> GELU -> Linear: the LayerNorm is foldable (its only writer is ``fc1``)."""

    def __init__(self, d_in: int = 8, d_hidden: int = 16, d_out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.norm = nn.LayerNorm(d_hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_hidden, d_out)
        self.example_input_array = torch.randn(2, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.norm(self.fc1(x))))


def tiny_ln_mlp() -> nn.Module:
    return TinyLNMLP()


def wide_ln_mlp() -> nn.Module:
    """Same keys as :func:`tiny_ln_mlp`, other shapes."""
    return TinyLNMLP(d_hidden=32)


def no_norm_mlp() -> nn.Module:
    """No normalization at all: nothing to fold."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model.example_input_array = torch.randn(2, 8)
    return model


def no_example_mlp() -> nn.Module:
    """A model that does not say what input it takes."""
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))


def needs_args(width: int) -> nn.Module:
    return nn.Linear(width, width)


def not_a_module() -> int:
    return 3


NOT_CALLABLE = 3


def vit_img32() -> nn.Module:
    """A timm ViT made with non-default sizes: its pretrained_cfg still says 224."""
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=5
    )


def wrong_cfg_mlp() -> nn.Module:
    """A model whose pretrained_cfg input size does not fit it."""
    model = TinyLNMLP()
    del model.example_input_array
    model.pretrained_cfg = {"input_size": (3, 5, 5)}
    return model
