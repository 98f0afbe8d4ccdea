"""How close to LayerNorm a converted model runs.

LayerNorm equivalence needs a swapped norm's input to be zero-mean.  :class:`InputMeanMonitor` measures
|mean| / RMS of each swapped norm's input with forward pre-hooks that exist only while it is attached (e.g.
during a logging step); :func:`layer_norm_gap` compares RMSNorm outputs with LayerNorm's on the same inputs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..norm import RMSNorm, RMSNorm2d
from ..verify import relative_error, run
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


def swapped_norms(module: nn.Module, verdict: str | None = None) -> dict[str, nn.Module]:
    """Qualified name -> norm module for every norm the conversions under ``module`` swapped; with
    ``verdict`` (``"exact"`` or ``"approximate"``) only the sites with that verdict."""
    out = {}
    for prefix, mod, state in converted_modules(module):
        for name in state.norms:
            if verdict is None or state.plan[name].verdict == verdict:
                out[f"{prefix}.{name}" if prefix else name] = mod.get_submodule(name)
    return out


class InputMeanMonitor:
    """Forward pre-hooks on every swapped norm under a module, recording each one's largest input mean ratio."""

    def __init__(self) -> None:
        self.ratios: dict[str, float] = {}
        self.attached = False
        self._handles: list = []

    def attach(self, module: nn.Module) -> None:
        self.ratios = {}
        self.attached = True
        for name, norm in swapped_norms(module).items():
            hook = norm.register_forward_pre_hook(lambda m, args, name=name: self._record(name, m, args))
            self._handles.append(hook)

    def _record(self, name: str, norm: nn.Module, args: tuple) -> None:
        self.ratios[name] = max(self.ratios.get(name, 0.0), input_mean_ratio(norm, args[0]))

    def detach(self) -> dict[str, float]:
        """Remove the hooks; returns the largest ratio seen per norm while attached."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.attached = False
        return dict(self.ratios)


@torch.no_grad()
def layer_norm_gap(model: nn.Module, norms: Iterable[nn.Module], args: tuple, kwargs: dict | None) -> float:
    """Largest relative difference, over ``norms`` while ``model`` runs on the inputs, between each RMSNorm's
    output and what LayerNorm (float64) computes on the same input: 0 up to rounding for exact sites."""
    worst = [0.0]

    def hook(norm: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        x, y = inputs[0], out
        if isinstance(norm, RMSNorm2d):
            x, y = x.movedim(1, -1), y.movedim(1, -1)
        ref = F.layer_norm(
            x.double(),
            norm.normalized_shape,
            None if norm.weight is None else norm.weight.double(),
            None if norm.bias is None else norm.bias.double(),
            norm.eps,
        )
        worst[0] = max(worst[0], relative_error(ref, y))

    handles = [norm.register_forward_hook(hook) for norm in norms if isinstance(norm, RMSNorm)]
    try:
        run(model, args, kwargs)
    finally:
        for h in handles:
            h.remove()
    return worst[0]
