"""RMSNorm modules that take the place of folded LayerNorms."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import nn

from .functional import rms_norm


def _as_shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(int(s) for s in normalized_shape)


class RMSNorm(nn.Module):
    """RMSNorm over the trailing dims with LayerNorm's parameters: gamma scale and beta as an added bias.

    On an input that is zero-mean over ``normalized_shape`` it computes exactly what ``nn.LayerNorm`` does.
    ``centered_input`` (set by :meth:`from_layer_norm` for fold and exact CBWC sites) records that promise:
    the backward is then LayerNorm's (:func:`~lightning_cbwc.norm.functional.rms_norm`), and without the C++
    kernel the CPU runs ``F.layer_norm``, never slower than the LayerNorm it replaced.
    """

    centered_input: bool = False

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = float(eps)
        self.elementwise_affine = elementwise_affine
        kw = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, **kw))
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape, **kw)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @classmethod
    def from_layer_norm(cls, ln: nn.LayerNorm, centered_input: bool = True) -> RMSNorm:
        """An RMSNorm that adopts ``ln``'s own weight and bias Parameter objects and its eps.

        ``centered_input``: its input is zero-mean by construction (a fold or an exact CBWC site); False for
        a plain swap or an approximate site, which must compute RMSNorm on any input.
        """
        norm = cls(ln.normalized_shape, eps=ln.eps, elementwise_affine=False)
        norm.elementwise_affine = ln.weight is not None or ln.bias is not None
        norm.weight = ln.weight
        norm.bias = ln.bias
        norm.centered_input = centered_input
        return norm

    def reset_parameters(self) -> None:
        """LayerNorm's init (weight ones, bias zeros): what a meta-device model's materialization calls."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, self.centered_input)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, weight={self.weight is not None}, "
            f"bias={self.bias is not None}"
        )


class RMSNorm2d(RMSNorm):
    """Channels-first RMSNorm over dim 1 of an (N, C, ...) tensor: the fold of timm's ``LayerNorm2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.movedim(1, -1)
        y = rms_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, self.centered_input)
        return y.movedim(-1, 1)
