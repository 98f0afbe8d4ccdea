"""How close to LayerNorm a converted model runs: the largest |mean| / RMS of a swapped norm's input.

LayerNorm equivalence needs every swapped norm's input to be zero-mean; :class:`InputMeanMonitor` measures
it with forward pre-hooks that exist only while it is attached (e.g. during a logging step).
"""

from __future__ import annotations

import torch
from torch import nn

from ..norm import RMSNorm2d
from .state import converted_modules


@torch.no_grad()
def input_mean_ratio(norm: nn.Module, x: torch.Tensor) -> float:
    """max over samples of |mean(x)| / RMS(x) over ``norm``'s normalized dims (0 for a zero-mean input)."""
    x = x.detach().float()
    if isinstance(norm, RMSNorm2d):
        x = x.movedim(1, -1)
    dims = tuple(range(-len(norm.normalized_shape), 0))
    if x.numel() == 0:
        return 0.0
    return float((x.mean(dim=dims).abs() / x.pow(2).mean(dim=dims).sqrt().clamp_min(1e-30)).max())


class InputMeanMonitor:
    """Forward pre-hooks on every swapped norm under a module, recording the largest input mean ratio."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.attached = False
        self._handles: list = []

    def attach(self, module: nn.Module) -> None:
        self.worst = 0.0
        self.attached = True
        for _, mod, state in converted_modules(module):
            for name in state.norms:
                hook = mod.get_submodule(name).register_forward_pre_hook(self._record)
                self._handles.append(hook)

    def _record(self, norm: nn.Module, args: tuple) -> None:
        self.worst = max(self.worst, input_mean_ratio(norm, args[0]))

    def detach(self) -> float:
        """Remove the hooks; returns the largest ratio seen while attached."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.attached = False
        return self.worst
