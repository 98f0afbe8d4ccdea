"""Example inputs of an export: named tensor leaves, dynamic dims, readable axis names, fresh random inputs.

The check of every artefact runs it on inputs it has not seen: another batch size and, for token inputs,
another sequence length than the example, when the exported program leaves those dims free.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import ExportError


def named_tensors(model: nn.Module, args: tuple, kwargs: dict) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor leaf of (args, kwargs) in pytree order, named after the forward's
    parameters (``x``, ``input_ids``, ``pixel_values_0`` for a list...)."""
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    flat, _ = pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))
    named = []
    for path, leaf in flat:
        if not isinstance(leaf, torch.Tensor):
            continue
        first = path[1]
        if path[0].idx == 0:
            i = first.idx
            head = params[i] if i < len(params) else f"input{i}"
        else:
            head = str(first.key)
        rest = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path[2:]]
        named.append(("_".join([head, *rest]), leaf))
    return named


def traceable_batch(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The example with batch 1 tiled to batch 2 (every tensor input of batch 1, the rows repeated), or None
    when it is not a batch-1 example: torch.export specializes a dim of size 1, so a batch-1 example would pin
    the artefact's batch to 1."""
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not leaves or any(t.shape[0] != 1 for t in leaves):
        return None

    def tile(t: Any) -> Any:
        return t.expand(2, *t.shape[1:]).contiguous() if isinstance(t, torch.Tensor) and t.dim() > 0 else t

    return pytree.tree_map(tile, (tuple(args), dict(kwargs)))


def dynamic_shapes_for(
    model: nn.Module, args: tuple, kwargs: dict, dynamic: bool = True
) -> dict[str, Any] | None:
    """A ``dynamic_shapes`` spec for torch.export: the batch dim (dim 0) of every tensor input free, and the
    sequence dim (dim 1) of token inputs (integer (B, T) tensors) and of (B, T, D) float inputs.

    ``Dim.AUTO`` lets torch.export keep a dim static where the model pins it (a ViT's token count)
    instead of failing; the dims that stayed free are read back from the exported program."""
    if not dynamic:
        return None
    auto = torch.export.Dim.AUTO

    def spec(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
            return None
        dims = {0: auto}
        if leaf.dim() >= 2 and (
            (not leaf.is_floating_point() and leaf.dim() == 2)
            or (leaf.is_floating_point() and leaf.dim() == 3)
        ):
            dims[1] = auto
        return dims

    try:
        combined = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except TypeError as e:
        raise ExportError(f"the example inputs do not fit {type(model).__name__}.forward: {e}") from e
    return {
        name: pytree.tree_map(spec, value, is_leaf=lambda x: x is None) for name, value in combined.items()
    }


def user_input_vals(ep: torch.export.ExportedProgram) -> list[Any]:
    """The example values of the program's tensor inputs; non-tensor user inputs (``use_cache=False``) are
    constants of the graph, listed by value in the signature, and skipped."""
    by_name = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    names = [n for n in ep.graph_signature.user_inputs if isinstance(n, str) and n in by_name]
    return [by_name[name].meta.get("val") for name in names]


def free_dims(
    ep: torch.export.ExportedProgram, named: list[tuple[str, torch.Tensor]]
) -> dict[str, dict[int, Any]]:
    """input name -> {dim: symbol} for the dims the exported program leaves free."""
    vals = [v for v in user_input_vals(ep) if isinstance(v, torch.Tensor)]
    if len(vals) != len(named):
        return {}
    out = {}
    for (name, _), val in zip(named, vals, strict=True):
        free = {i: s.node.expr for i, s in enumerate(val.shape) if isinstance(s, torch.SymInt)}
        if free:
            out[name] = free
    return out


def axis_names(free: dict[str, dict[int, Any]], named: list[tuple[str, torch.Tensor]]) -> dict[Any, str]:
    """symbol -> readable axis name: ``batch`` for dim 0, ``seq`` for dim 1, ``dim<k>`` beyond; free dims of the
    same position and example size share a name (an ``attention_mask`` has the ``batch`` and ``seq`` of the
    ``input_ids``), others get ``seq2``..."""
    tensors = dict(named)
    by_key: dict[tuple[int, int], str] = {}
    names: dict[Any, str] = {}
    for name, dims in free.items():
        for d, sym in sorted(dims.items()):
            key = (d, int(tensors[name].shape[d]))
            if key not in by_key:
                base = {0: "batch", 1: "seq"}.get(d, f"dim{d}")
                n_same = sum(1 for k in by_key if k[0] == d)
                by_key[key] = base if n_same == 0 else f"{base}{n_same + 1}"
            names.setdefault(sym, by_key[key])
    return names


def _pick_size(size: int, dim: int, lower: int, upper: Any) -> int:
    """Another size than ``size`` within [lower, upper]: batch + 1, other dims - 1 when they are > 3."""
    candidates = [size + 1, size - 1] if dim == 0 or size <= 3 else [size - 1, size + 1]
    for c in candidates:
        if c >= max(lower, 2) and (upper is None or c <= upper):
            return c
    return size


def symbol_sizes(
    ep: torch.export.ExportedProgram, free: dict[str, dict[int, Any]], named: list[tuple[str, torch.Tensor]]
) -> dict[Any, int]:
    ranges = {}
    for sym, vr in ep.range_constraints.items():
        lo = int(vr.lower) if math.isfinite(float(vr.lower)) else 0
        hi = int(vr.upper) if math.isfinite(float(vr.upper)) else None
        ranges[sym] = (lo, hi)
    tensors = dict(named)
    sizes: dict[Any, int] = {}
    for name, dims in free.items():
        for d, sym in sorted(dims.items()):
            if sym in sizes or not getattr(sym, "is_symbol", False):
                continue
            lo, hi = ranges.get(sym, (0, None))
            sizes[sym] = _pick_size(int(tensors[name].shape[d]), d, lo, hi)
    return sizes


def fresh_inputs(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    free: dict[str, dict[int, Any]] | None = None,
    sizes: dict[Any, int] | None = None,
    seed: int = 1234,
) -> tuple[tuple, dict]:
    """New random inputs shaped like the examples, with the free dims resized (``sizes``: symbol -> size).

    Floats: standard normal.  Integer tensors named ``*mask*``: ones.  Other integer tensors (token ids):
    uniform over the range the example used, so every id stays valid."""
    gen = torch.Generator().manual_seed(seed)
    free, sizes = free or {}, sizes or {}
    named = iter(named_tensors(model, args, kwargs))

    def make(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        name, _ = next(named)
        shape = list(leaf.shape)
        for d, sym in free.get(name, {}).items():
            shape[d] = sizes.get(sym, shape[d])
        if leaf.is_floating_point():
            return torch.randn(shape, generator=gen, dtype=leaf.dtype).to(leaf.device)
        if leaf.dtype == torch.bool or "mask" in name.lower():
            return torch.ones(shape, dtype=leaf.dtype, device=leaf.device)
        lo = int(leaf.min()) if leaf.numel() else 0
        hi = int(leaf.max()) + 1 if leaf.numel() else 1
        return torch.randint(lo, max(hi, lo + 1), shape, generator=gen, dtype=leaf.dtype).to(leaf.device)

    new_args, new_kwargs = pytree.tree_map(make, (tuple(args), dict(kwargs)))
    return tuple(new_args), dict(new_kwargs)


def input_shapes(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, list[int]]:
    return {name: list(t.shape) for name, t in named_tensors(model, args, kwargs)}
