"""Image classification: a small timm ViT on Fashion-MNIST (28x28 grey images, 10 classes).

    python recipes/image_classification.py fit -c configs/image_classification_ln.yaml     # LayerNorm baseline
    python recipes/image_classification.py fit -c configs/image_classification_cbwc.yaml   # CBWC + RMSNorm
    python recipes/image_classification.py fit -c configs/image_classification_ln.yaml --print_config

The data come from Debian's ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``); see
:mod:`lightning_cbwc.data.fashion_mnist`.  Outputs go under ``--run_dir`` (checkpoints, CSV and offline W&B
logs, ``summary.json``, the folded export).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lightning_cbwc.data import FashionMNISTDataModule  # noqa: E402
from recipes._cli import RecipeCLI, script_main  # noqa: E402
from recipes._steps import ClassifierSteps  # noqa: E402


def create_vit(
    model_name: str = "vit_tiny_patch16_224",
    img_size: int = 28,
    patch_size: int = 4,
    in_chans: int = 1,
    num_classes: int = 10,
    embed_dim: int = 96,
    depth: int = 4,
    num_heads: int = 3,
    mlp_ratio: float = 2.0,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """A timm ViT with random weights (``pretrained=False``: nothing is downloaded)."""
    return timm.create_model(
        model_name,
        pretrained=False,
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        drop_path_rate=drop_path_rate,
    )


class ViTClassifier(ClassifierSteps, L.LightningModule):
    """A timm ViT classifier with LayerNorm (CBWC converts it when its callback is configured).

    Args:
        model_name: a timm ViT architecture; the size arguments below override its defaults.
        img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio, drop_path_rate:
            the ViT's shape.
        lr: peak AdamW learning rate; weight_decay: on matrices only; warmup_steps: linear warm-up, then cosine.
        label_smoothing: of the cross-entropy.
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        img_size: int = 28,
        patch_size: int = 4,
        in_chans: int = 1,
        num_classes: int = 10,
        embed_dim: int = 96,
        depth: int = 4,
        num_heads: int = 3,
        mlp_ratio: float = 2.0,
        drop_path_rate: float = 0.0,
        lr: float = 2e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 100,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = self.build_net()
        self.example_input_array = torch.zeros(2, in_chans, img_size, img_size)
        self._add_accuracy(num_classes)

    def build_net(self) -> nn.Module:
        h = self.hparams
        return create_vit(
            h.model_name,
            h.img_size,
            h.patch_size,
            h.in_chans,
            h.num_classes,
            h.embed_dim,
            h.depth,
            h.num_heads,
            h.mlp_ratio,
            h.drop_path_rate,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(-1)


class ImageClassificationCLI(RecipeCLI):
    recipe = "image_classification"

    def add_recipe_arguments(self, parser) -> None:
        parser.set_defaults({"checkpoint.monitor": "val/acc", "checkpoint.mode": "max"})


def main(args: list[str] | None = None, run: bool = True) -> ImageClassificationCLI:
    return ImageClassificationCLI(ViTClassifier, FashionMNISTDataModule, args=args, run=run)


if __name__ == "__main__":
    script_main("recipes.image_classification")
