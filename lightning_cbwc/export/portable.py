"""RMSNorms that torch.export serializes and the ONNX exporter translates.

The package's RMSNorm modules call its fused C++ kernel (the ``lightning_cbwc::rms_norm`` custom op), which
neither ``torch.export.load`` without this package nor ONNX knows.  Inside :func:`portable_norms` they compute
with stock ``F.rms_norm`` plus the bias instead: a pt2 program is then plain aten, and the ONNX exporter
(opset >= 23) turns ``aten.rms_norm`` into the standard ``RMSNormalization`` op.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..norm import RMSNorm, RMSNorm2d


def _portable_forward(self: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if weight is None:  # a constant scale, else the ONNX exporter builds ones with Shape + ConstantOfShape
        weight = torch.ones(self.normalized_shape, dtype=x.dtype, device=x.device)
    y = F.rms_norm(x, self.normalized_shape, weight, self.eps)
    return y + self.bias if self.bias is not None else y


def _portable_forward_2d(self: RMSNorm2d, x: torch.Tensor) -> torch.Tensor:
    return _portable_forward(self, x.movedim(1, -1)).movedim(-1, 1)


@contextlib.contextmanager
def portable_norms(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every RMSNorm of ``model`` computes with stock ``F.rms_norm`` + bias (aten ops that
    torch.export serializes and the ONNX exporter translates) instead of the package's custom-op kernel."""
    patched = []
    for mod in model.modules():
        if isinstance(mod, RMSNorm) and "forward" not in mod.__dict__:
            fn = _portable_forward_2d if isinstance(mod, RMSNorm2d) else _portable_forward
            mod.forward = types.MethodType(fn, mod)
            patched.append(mod)
    try:
        yield model
    finally:
        for mod in patched:
            mod.__dict__.pop("forward", None)
