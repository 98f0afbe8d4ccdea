"""Fashion-MNIST from the IDX ``.gz`` files of Debian's ``dataset-fashion-mnist`` package (nothing downloaded).

    sudo apt-get install dataset-fashion-mnist     # /usr/share/datasets/fashion-mnist/*-idx?-ubyte.gz

Any folder holding the four original files (``train-images-idx3-ubyte.gz`` ...) works: ``data_dir=...``.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: pixel mean and std of the training images (scaled to [0, 1])
MEAN, STD = 0.2860, 0.3530

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataNotFoundError(FileNotFoundError):
    """A data set's files are not where the recipe looks; the message says how to get them."""


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain): magic ``00 00 <dtype> <ndim>``, big-endian uint32 dims, data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (magic bytes {raw[:4].hex() or 'missing'})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says {dims} ({expected} bytes), the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def find_files(data_dir: str | os.PathLike[str], split: str) -> tuple[Path, Path]:
    """The (images, labels) files of ``split`` in ``data_dir``, or a DataNotFoundError saying how to get them."""
    folder = Path(data_dir)
    paths = tuple(folder / name for name in FILES[split])
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DataNotFoundError(
            f"Fashion-MNIST not found: {', '.join(missing)} missing in {folder}. Install Debian's data package "
            "(as root: `apt-get install dataset-fashion-mnist`, which puts the IDX .gz files in "
            f"{DEFAULT_DIR}), or copy the four original *-ubyte.gz files into a folder and pass it as "
            "data_dir (--data.data_dir DIR)."
        )
    return paths  # type: ignore[return-value]


def load_split(data_dir: str | os.PathLike[str], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 28, 28) and int64 labels (N,) of the ``train`` or ``test`` split."""
    images_path, labels_path = find_files(data_dir, split)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{images_path} / {labels_path}: shapes {images.shape} and {labels.shape} do not match"
        )
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28), standardized with the training set's mean and std."""
    return ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1)


class FashionMNISTDataModule(L.LightningDataModule):
    """Fashion-MNIST held in memory: a train/val split of the 60k training images, the 10k test images.

    Args:
        data_dir: folder with the four IDX ``.gz`` files (default: where Debian's package puts them).
        batch_size: per step, for every split.
        val_size: training images held out for validation (the last ones of a seeded permutation).
        train_size: use only this many of the remaining training images (None: all); for quick runs.
        test_size: use only the first this many test images (None: all 10k).
        seed: seed of the train/val permutation.
        num_workers: DataLoader workers (the data are in memory: 0 is usually fastest).
    """

    num_classes = len(CLASSES)

    def __init__(
        self,
        data_dir: str = DEFAULT_DIR,
        batch_size: int = 128,
        val_size: int = 5000,
        train_size: int | None = None,
        test_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.val_size = val_size
        self.train_size = train_size
        self.test_size = test_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    @property
    def example_input(self) -> torch.Tensor:
        return torch.zeros(2, 1, 28, 28)

    def prepare_data(self) -> None:
        for split in FILES:
            find_files(self.data_dir, split)  # fail early, with the hint

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            images, labels = load_split(self.data_dir, "train")
            perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed))
            val_idx, train_idx = perm[: self.val_size], perm[self.val_size :]
            if self.train_size is not None:
                train_idx = train_idx[: self.train_size]
            self.train_set = TensorDataset(normalize(images[train_idx]), labels[train_idx])
            self.val_set = TensorDataset(normalize(images[val_idx]), labels[val_idx])
        if stage in (None, "test", "predict") and self.test_set is None:
            images, labels = load_split(self.data_dir, "test")
            n = self.test_size if self.test_size is not None else len(images)
            self.test_set = TensorDataset(normalize(images[:n]), labels[:n])

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() first")
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
