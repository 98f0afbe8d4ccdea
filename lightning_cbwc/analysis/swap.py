"""Which LayerNorm modules have an RMSNorm replacement, and in which layout: known classes, and subclasses
whose captured forward is their own layer_norm (moved to channels-last and back, or not)."""

from __future__ import annotations

import functools
import operator
import sys
from collections.abc import Callable

import torch
from torch import fx, nn

aten = torch.ops.aten
#: the aten ops a LayerNorm runs in a captured graph
LAYER_NORM_OPS = (aten.layer_norm.default, aten.native_layer_norm.default)

#: module class -> layout of the normalized dims ("channels_last": trailing dims, "channels_first": dim 1)
SWAPPABLE: dict[type, str] = {nn.LayerNorm: "channels_last"}


@functools.cache
def _timm_classes() -> dict[type, str]:
    from timm.layers import norm as timm_norm

    table = {timm_norm.LayerNorm: "channels_last", timm_norm.LayerNorm2d: "channels_first"}
    for name in ("LayerNormFp32", "LayerNorm2dFp32"):
        table.pop(getattr(timm_norm, name, None), None)
    return table


def swap_kind(module: nn.Module) -> str | None:
    """The layout of ``module``'s normalized dims if it can be swapped for an RMSNorm, else None.  A subclass
    of ``nn.LayerNorm`` that keeps the stock ``forward`` (only adds attributes or methods) counts as one."""
    kind = SWAPPABLE.get(type(module))
    if kind is None and "timm" in sys.modules:  # a timm module exists only once timm is imported
        kind = _timm_classes().get(type(module))
    if kind is None and isinstance(module, nn.LayerNorm) and type(module).forward is nn.LayerNorm.forward:
        kind = "channels_last"
    return kind


def traced_layout(
    module: nn.Module, inside: list[fx.Node], tensor_of: Callable[[fx.Node], torch.Tensor | None]
) -> str | None:
    """The layout of a LayerNorm subclass with its own forward, read off its captured calls (``inside``: every
    op it ran): its own layer_norm (weight, bias, shape, eps) and nothing else ("channels_last"), or that
    between a move of dim 1 to the end and back ("channels_first", torchvision's ``LayerNorm2d``).  Else None."""
    if not isinstance(module, nn.LayerNorm):
        return None
    region, used, layouts = set(inside), set(), set()
    for ln in (n for n in inside if n.target in LAYER_NORM_OPS):
        call = _own_layer_norm(module, ln, tensor_of)
        if call is None:
            return None
        x, out, nodes = call
        used |= nodes
        if x not in region and not region.intersection(out.users):
            layouts.add("channels_last")
            continue
        back = next(iter(out.users), None)
        rank = len(x.args[1]) if x.target is aten.permute.default else 0
        if not (
            rank >= 3
            and len(module.normalized_shape) == 1
            and x in region
            and x.args[0] not in region
            and list(x.users) == [ln]
            and list(x.args[1]) == [0, *range(2, rank), 1]
            and len(out.users) == 1
            and back.target is aten.permute.default
            and list(back.args[1]) == [0, rank - 1, *range(1, rank - 1)]
            and not region.intersection(back.users)
        ):
            return None
        used |= {x, back}
        layouts.add("channels_first")
    return layouts.pop() if len(layouts) == 1 and used == region else None


def _own_layer_norm(
    module: nn.LayerNorm, ln: fx.Node, tensor_of: Callable[[fx.Node], torch.Tensor | None]
) -> tuple[fx.Node, fx.Node, set[fx.Node]] | None:
    """(input, normalized output, nodes of the call) when ``ln`` is ``module``'s own layer_norm, else None."""
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    args = {"weight": None, "bias": None, "eps": 1e-5, **dict(zip(names, ln.args, strict=False)), **ln.kwargs}
    for attr in ("weight", "bias"):
        own, arg = getattr(module, attr), args[attr]
        if (own is None) != (arg is None) or (arg is not None and tensor_of(arg) is not own):
            return None
    if tuple(args["normalized_shape"]) != tuple(module.normalized_shape) or args["eps"] != module.eps:
        return None
    if ln.target is aten.layer_norm.default:
        return args["input"], ln, {ln}
    outs = {u.args[1]: u for u in ln.users if u.target is operator.getitem}
    if len(outs) != len(ln.users) or 0 not in outs or any(outs[i].users for i in outs if i != 0):
        return None
    return args["input"], outs[0], {ln, *outs.values()}
