"""What the analysis knows about each tensor of the graph.

Zero-mean pass (is the tensor zero-mean once its writers are centered?):
  Centered(axes, writers)  zero-mean over ``axes`` once ``writers`` are centered; the centering shift is
                           uniform over ``axes``.
  Free(options)            a parameter or buffer: it can be centered over whichever of its dims lines up
                           with the dims it is added to.  options: (placeholder, param dim, tensor axes).
  Broken(reason)           not zero-mean, and why.
  Multi(items)             the facts of a tuple output (split, unbind, native_layer_norm).

Shift pass (does centering the chosen writers change this tensor?):
  Shift(axes, writers)     shifted by a per-sample amount that is uniform over ``axes`` (None: not uniform
                           over any axes), caused by centering ``writers``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .axes import Axes
from .plan import Writer


@dataclass(frozen=True)
class Centered:
    axes: Axes
    writers: frozenset[Writer]


@dataclass(frozen=True)
class Free:
    options: frozenset[tuple[str, int, Axes]]


@dataclass(frozen=True)
class Broken:
    reason: str


@dataclass(frozen=True)
class Multi:
    items: tuple


@dataclass(frozen=True)
class Shift:
    axes: Axes | None
    writers: frozenset[str]


Fact = Centered | Free | Broken | Multi


def merge_shifts(shifts: list[Shift]) -> Shift | None:
    """The shift of a sum: uniform over A only when every shifted term is uniform over A."""
    shifts = [s for s in shifts if s is not None]
    if not shifts:
        return None
    axes = shifts[0].axes
    if any(s.axes != axes for s in shifts[1:]):
        axes = None
    return Shift(axes, frozenset().union(*(s.writers for s in shifts)))
