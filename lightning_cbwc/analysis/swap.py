"""Which LayerNorm module classes have an RMSNorm replacement, and in which layout."""

from __future__ import annotations

import functools
import sys

from torch import nn

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
