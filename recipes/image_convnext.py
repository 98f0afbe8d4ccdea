"""Image classification where exactness is partially broken: a small timm ConvNeXt on Fashion-MNIST.

    python recipes/image_convnext.py fit -c configs/image_convnext_ln.yaml     # LayerNorm baseline
    python recipes/image_convnext.py fit -c configs/image_convnext_cbwc.yaml   # CBWC + RMSNorm

A ConvNeXt block normalizes the output of a depthwise convolution, which mixes no channels, so no linear layer
writes that LayerNorm's input: with the default ``CBWC()`` only the LayerNorms the stem and the downsampling
convolutions feed fold, the block LayerNorms stay LayerNorms.  ``CBWC(replace="all")`` swaps those too
(approximately: their input is not zero-mean), the paper's practical setting.  Same data, outputs and
options as ``image_classification``.
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


def create_convnext(
    model_name: str = "convnext_atto",
    in_chans: int = 1,
    num_classes: int = 10,
    dims: tuple[int, int, int, int] = (16, 32, 64, 128),
    depths: tuple[int, int, int, int] = (1, 1, 2, 1),
    patch_size: int = 1,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """A timm ConvNeXt with random weights (``pretrained=False``: nothing is downloaded).  Four stages, the
    first at the stem's resolution (28x28 with ``patch_size=1``), then 14, 7 and 3."""
    return timm.create_model(
        model_name,
        pretrained=False,
        in_chans=in_chans,
        num_classes=num_classes,
        dims=tuple(dims),
        depths=tuple(depths),
        patch_size=patch_size,
        drop_path_rate=drop_path_rate,
    )


class ConvNeXtClassifier(ClassifierSteps, L.LightningModule):
    """A timm ConvNeXt classifier with LayerNorm (CBWC converts it when its callback is configured).

    Args:
        model_name: a timm ConvNeXt architecture; the size arguments below override its defaults.
        img_size: of the (square) input images; in_chans, num_classes, dims, depths, patch_size (the stem's
            stride), drop_path_rate: the ConvNeXt's shape.
        lr: peak AdamW learning rate; weight_decay: on matrices only; warmup_steps: linear warm-up, then cosine.
        label_smoothing: of the cross-entropy.
    """

    def __init__(
        self,
        model_name: str = "convnext_atto",
        img_size: int = 28,
        in_chans: int = 1,
        num_classes: int = 10,
        dims: tuple[int, int, int, int] = (16, 32, 64, 128),
        depths: tuple[int, int, int, int] = (1, 1, 2, 1),
        patch_size: int = 1,
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
        return create_convnext(
            h.model_name, h.in_chans, h.num_classes, h.dims, h.depths, h.patch_size, h.drop_path_rate
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(-1)


class ImageConvNeXtCLI(RecipeCLI):
    recipe = "image_convnext"

    def add_recipe_arguments(self, parser) -> None:
        parser.set_defaults({"checkpoint.monitor": "val/acc", "checkpoint.mode": "max"})


def main(args: list[str] | None = None, run: bool = True) -> ImageConvNeXtCLI:
    return ImageConvNeXtCLI(ConvNeXtClassifier, FashionMNISTDataModule, args=args, run=run)


if __name__ == "__main__":
    script_main("recipes.image_convnext")
