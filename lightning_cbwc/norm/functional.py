"""The functional RMSNorm entry point: every RMSNorm module calls :func:`rms_norm`.

y = x / sqrt(mean(x^2 over the normalized dims) + eps) * weight + bias.  The kernels behind it live in this
package; this module picks one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def rms_norm(
    x: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """RMSNorm over the trailing ``normalized_shape`` dims, with an optional added bias."""
    y = F.rms_norm(x, tuple(normalized_shape), weight, eps)
    if bias is not None:
        y = y + bias
    return y
