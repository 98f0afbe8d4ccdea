"""How view-like ops move tensor axes: the pure shape arithmetic behind the analysis rules.

An axis set is a frozenset of non-negative axis indices of one tensor.  Each function maps an axis set of
an op's input to the axis set of its output, or returns None when the op mixes those axes with others
(the zero-mean fact, or the uniformity of a shift, does not survive).
"""

from __future__ import annotations

from collections.abc import Sequence

Axes = frozenset[int]


def norm_dim(dim: int, rank: int) -> int:
    """A dim index made non-negative."""
    return dim + rank if dim < 0 else dim


def reshape_groups(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of ``src`` axes with runs of ``dst`` axes that hold the same elements (equal products).

    Size-1 axes form groups of their own (on either side) so that unsqueeze/squeeze map cleanly.
    Returns None when the shapes do not describe a reshape (element counts differ).
    """
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        if i < len(src) and src[i] == 1 and not (j < len(dst) and dst[j] == 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < len(dst) and dst[j] == 1 and not (i < len(src) and src[i] == 1):
            groups.append(([], [j]))
            j += 1
            continue
        if i < len(src) and j < len(dst) and src[i] == 1 and dst[j] == 1:
            groups.append(([i], [j]))
            i += 1
            j += 1
            continue
        if i >= len(src) or j >= len(dst):
            return None
        a, b = [i], [j]
        pa, pb = src[i], dst[j]
        i += 1
        j += 1
        while pa != pb:
            if pa < pb:
                if i >= len(src):
                    return None
                pa *= src[i]
                a.append(i)
                i += 1
            else:
                if j >= len(dst):
                    return None
                pb *= dst[j]
                b.append(j)
                j += 1
        groups.append((a, b))
    return groups


def map_reshape(axes: Axes, src: Sequence[int], dst: Sequence[int], merge: bool = False) -> Axes | None:
    """Axes through a reshape: a group of input axes maps to its output group only when taken whole.

    Centering over a set of axes is centering over their product, so a group that lies wholly inside the
    set maps to its whole output group; a group that is cut (some axes in, some out) breaks the fact, unless
    ``merge`` (zero-mean facts only) and the group becomes one output axis: that axis is a union of whole
    zero-mean fibres (Swin's patch merging: (2, 2, C) -> 4C), so it is zero-mean too.  A uniform shift is
    not uniform after such a merge, so the shift pass never merges.
    Size-1 axes inside the set are dropped or kept as the reshape does.
    """
    groups = reshape_groups(src, dst)
    if groups is None:
        return None
    out: set[int] = set()
    for a, b in groups:
        inside = [x for x in a if x in axes]
        if not inside:
            continue
        if len(inside) != len(a) and not (merge and len(b) == 1):
            return None
        out.update(b)
    if axes and not out and any(src[a] != 1 for a in axes):
        return None
    return frozenset(out) if out or not axes else None


def map_permute(axes: Axes, perm: Sequence[int]) -> Axes:
    """Axes through a permute: output axis i is input axis perm[i]."""
    rank = len(perm)
    perm = [norm_dim(p, rank) for p in perm]
    return frozenset(perm.index(a) for a in axes)


def map_transpose(axes: Axes, d0: int, d1: int, rank: int) -> Axes:
    d0, d1 = norm_dim(d0, rank), norm_dim(d1, rank)
    swap = {d0: d1, d1: d0}
    return frozenset(swap.get(a, a) for a in axes)


def map_remove(axes: Axes, removed: Sequence[int], rank: int) -> Axes | None:
    """Axes after the dims ``removed`` disappear (select, reductions without keepdim); None if one is in axes."""
    removed_set = {norm_dim(d, rank) for d in removed}
    if axes & removed_set:
        return None
    return frozenset(a - sum(1 for r in removed_set if r < a) for a in axes)


def map_right_aligned(axes: Axes, in_rank: int, out_rank: int) -> Axes:
    """Axes of a broadcast operand in the coordinates of the (right-aligned) output."""
    return frozenset(a + (out_rank - in_rank) for a in axes)


def to_operand(axes: Axes, operand_shape: Sequence[int], out_rank: int) -> tuple[Axes, bool]:
    """Output axes in the coordinates of a broadcast operand: (operand axes, every axis present and not size 1)."""
    shift = out_rank - len(operand_shape)
    mapped = frozenset(a - shift for a in axes if a - shift >= 0)
    full = len(mapped) == len(axes) and all(operand_shape[a] != 1 for a in mapped)
    return mapped, full


def constant_along(axes: Axes, operand_shape: Sequence[int], out_rank: int) -> bool:
    """True when a broadcast operand has size 1 (or no dim) along every axis in ``axes``."""
    shift = out_rank - len(operand_shape)
    return all(a - shift < 0 or operand_shape[a - shift] == 1 for a in axes)
