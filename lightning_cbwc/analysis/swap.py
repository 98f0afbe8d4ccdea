"""Which LayerNorm module classes have an RMSNorm replacement, and in which layout."""

from __future__ import annotations

from torch import nn


def _timm_classes() -> dict[type, str]:
    try:
        from timm.layers import norm as timm_norm
    except ImportError:  # timm is a dependency, but keep the analysis importable without it
        return {}
    table = {timm_norm.LayerNorm: "channels_last", timm_norm.LayerNorm2d: "channels_first"}
    for name in ("LayerNormFp32", "LayerNorm2dFp32"):
        table.pop(getattr(timm_norm, name, None), None)
    return table


#: module class -> layout of the normalized dims ("channels_last": trailing dims, "channels_first": dim 1)
SWAPPABLE: dict[type, str] = {nn.LayerNorm: "channels_last", **_timm_classes()}


def swap_kind(module: nn.Module) -> str | None:
    """The layout of ``module``'s normalized dims if it can be swapped for an RMSNorm, else None."""
    return SWAPPABLE.get(type(module))
