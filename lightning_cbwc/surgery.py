"""fold(): turn a trained LayerNorm model into an RMSNorm model with the same outputs.

capture -> analyze -> center the writers (float64, cast back) -> swap each foldable LayerNorm for an
RMSNorm with the same gamma, beta and eps -> optionally fuse gamma/beta into the linears the norm feeds
-> check the outputs against the original.  Each step is a small function over (model, plan).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .analysis import FoldPlan, analyze_captured, capture
from .analysis.capture import module_path
from .analysis.swap import swap_kind
from .centering import CenteredEmbedding, center_, fold_scale_
from .errors import FoldCheckError, FoldingError
from .norm import RMSNorm, RMSNorm2d
from .verify import is_low_precision, max_relative_error, rounding_baseline, run, tolerance

log = logging.getLogger("lightning_cbwc")
aten = torch.ops.aten


@dataclass
class _Undo:
    """What a fold changed, so a failed in-place fold can put the model back as it was."""

    steps: list[Callable[[], None]] = field(default_factory=list)

    def tensor(self, t: torch.Tensor) -> None:
        saved = t.detach().clone()
        self.steps.append(lambda: t.data.copy_(saved))

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        old = getattr(obj, name)
        self.steps.append(lambda: setattr(obj, name, old))
        setattr(obj, name, value)

    def rollback(self) -> None:
        with torch.no_grad():
            for step in reversed(self.steps):
                step()


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_buffer(name)


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module, undo: _Undo) -> None:
    """Put ``new`` wherever ``old`` is registered (a shared module may sit under several names)."""
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is old:
                undo.setattr(parent, name, new)


def center_writers(model: nn.Module, plan: FoldPlan, undo: _Undo | None = None) -> None:
    """Center every writer of the plan's foldable norms; fold LayerScales first; center tied tables at lookup."""
    undo = undo or _Undo()
    writers = plan.writers
    scales = {}
    for w in writers:
        if w.kind == "embedding_lookup":
            emb = model.get_submodule(w.module)
            if not isinstance(emb, CenteredEmbedding):
                if type(emb) is not nn.Embedding:
                    raise FoldingError(
                        f"{w.module} is a {type(emb).__name__}, not an nn.Embedding: cannot center it at the lookup"
                    )
                _replace_module(model, emb, CenteredEmbedding.adopt(emb), undo)
            continue
        t = _tensor(model, w.param)
        undo.tensor(t)
        if w.scale:
            g = _tensor(model, w.scale)
            fold_scale_(t, g, w.dim)
            scales[w.scale] = g
        center_(t, w.dim)
    for g in scales.values():
        undo.tensor(g)
        with torch.no_grad():
            g.fill_(1)


def swap_norms(model: nn.Module, plan: FoldPlan, undo: _Undo | None = None) -> dict[str, RMSNorm]:
    """Replace each foldable LayerNorm module by an RMSNorm adopting its weight, bias and eps."""
    undo = undo or _Undo()
    swapped = {}
    for site in plan.foldable:
        ln = model.get_submodule(site.name)
        kind = swap_kind(ln)
        if kind is None:
            raise FoldingError(
                f"{site.name} is a {type(ln).__name__}: no RMSNorm replacement is known for it"
            )
        norm = (RMSNorm2d if kind == "channels_first" else RMSNorm).from_layer_norm(ln)
        norm.train(ln.training)
        _replace_module(model, ln, norm, undo)
        swapped[site.name] = norm
    return swapped


# ------------------------------------------------------------------------------------- affine fusion

_AFFINE_TRANSPARENT = {
    aten.dropout.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.select.int,
    aten.slice.Tensor,
    aten.index.Tensor,
    aten.mean.dim,
    aten.view.default,
    aten.reshape.default,
}
#: op -> (input arg, weight arg, bias arg, weight dim that meets the normalized features)
_AFFINE_CONSUMERS = {aten.linear.default: (0, 1, 2, 1), aten.addmm.default: (1, 2, 0, 0)}


def _affine_consumers(ln_node: fx.Node, normalized_rank: int) -> list[fx.Node] | None:
    """The linear nodes that consume a norm's output through ops that commute with a per-channel affine
    (eval dropout, selects and slices of other dims, token means, reshapes keeping the last dim); None if
    anything else consumes it."""
    out, todo = [], [(u, ln_node) for u in ln_node.users]
    while todo:
        n, src = todo.pop()
        if n.op != "call_function":
            return None
        if n.target in _AFFINE_CONSUMERS:
            if n.args[_AFFINE_CONSUMERS[n.target][0]] is not src:
                return None
            out.append(n)
            continue
        if n.target not in _AFFINE_TRANSPARENT or n.args[0] is not src:
            return None
        rank = len(src.meta["val"].shape)
        if n.target in (aten.select.int, aten.slice.Tensor, aten.mean.dim):
            dims = n.args[1] if isinstance(n.args[1], list | tuple) else [n.args[1]]
            if any((d + rank) % rank >= rank - normalized_rank for d in dims):
                return None
        if n.target is aten.index.Tensor and len(n.args[1]) > rank - normalized_rank:
            return None
        if n.target in (aten.view.default, aten.reshape.default):
            if n.meta["val"].shape[-1] != src.meta["val"].shape[-1]:
                return None
        todo.extend((u, n) for u in n.users)
    return out


@torch.no_grad()
def fuse_affine_(
    model: nn.Module, plan: FoldPlan, graph: fx.Graph, placeholders: dict, undo: _Undo
) -> list[str]:
    """Fold gamma/beta of swapped norms into the linears they feed, when those are their only consumers.

    W' = W diag(gamma), b' = b + W beta (nn.Linear; HF Conv1D likewise on its (in, out) weight); the norm
    becomes weight-free.  Returns the fused norm names.
    """
    nodes_of: dict[str, list[fx.Node]] = {}
    for n in graph.nodes:
        if n.op == "call_function" and n.target is aten.layer_norm.default:
            nodes_of.setdefault(module_path(n)[0], []).append(n)
    fused = []
    for site in plan.foldable:
        norm = model.get_submodule(site.name)
        lns = [n for name in (site.name, *site.aliases) for n in nodes_of.get(name, [])]
        if (
            type(norm) is not RMSNorm
            or norm.weight is None
            or len(lns) != 1
            or len(norm.normalized_shape) != 1
        ):
            continue
        consumers = _affine_consumers(lns[0], 1)
        if not consumers:
            continue
        targets = []
        for node in consumers:
            _, w_arg, _, in_dim = _AFFINE_CONSUMERS[node.target]
            w = node.args[w_arg]
            path = module_path(node)[0]
            mod = model.get_submodule(path) if path else None
            ok = (
                mod is not None
                and isinstance(w, fx.Node)
                and w.op == "placeholder"
                and len(w.users) == 1
                and placeholders.get(w.name, ("", ""))[1] == f"{path}.weight"
                and isinstance(getattr(mod, "bias", None), nn.Parameter | None)
            )
            if not ok:
                break
            targets.append((mod, in_dim))
        else:
            gamma = norm.weight.detach().to(torch.float64)
            beta = norm.bias.detach().to(torch.float64) if norm.bias is not None else None
            for mod, in_dim in dict.fromkeys(targets):
                w64 = mod.weight.detach().to(torch.float64)
                shape = [1, 1]
                shape[in_dim] = -1
                undo.tensor(mod.weight)
                if beta is not None:
                    extra = w64 @ beta if in_dim == 1 else beta @ w64
                    if mod.bias is None:
                        undo.setattr(mod, "bias", nn.Parameter(extra.to(mod.weight.dtype)))
                    else:
                        undo.tensor(mod.bias)
                        mod.bias.copy_((mod.bias.detach().to(torch.float64) + extra).to(mod.bias.dtype))
                mod.weight.copy_((w64 * gamma.reshape(shape)).to(mod.weight.dtype))
            undo.setattr(norm, "weight", None)
            undo.setattr(norm, "bias", None)
            undo.setattr(norm, "elementwise_affine", False)
            fused.append(site.name)
    return fused


# ------------------------------------------------------------------------------------- fold


def fold(
    model: nn.Module,
    example_inputs: Any,
    example_kwargs: dict[str, Any] | None = None,
    *,
    fuse_affine: bool = False,
    inplace: bool = False,
    check: bool = True,
    tol: float | None = None,
) -> nn.Module:
    """An RMSNorm model with the same outputs as ``model``: foldable LayerNorms swapped, writers centered.

    Works on a deep copy unless ``inplace``.  With ``check`` the outputs on the example inputs are compared
    with the original's; beyond a dtype-aware tolerance (or ``tol``) it raises FoldingError and an in-place
    fold is rolled back.  The result carries ``cbwc_plan`` and, when checked, ``cbwc_max_error``.
    """
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    ref = run(model, example_inputs, example_kwargs) if check else None
    # bf16/fp16: the original is itself only so close to its float32 self; allow the fold the same slack
    noise = (
        rounding_baseline(model, example_inputs, example_kwargs, ref)
        if check and is_low_precision(ref)
        else 0.0
    )
    target = model if inplace else copy.deepcopy(model)
    cap = capture(target, example_inputs, example_kwargs)
    plan = analyze_captured(cap)
    undo = _Undo()
    try:
        if not plan.foldable:
            log.warning("nothing to fold in %s: %s", type(model).__name__, plan.summary())
        center_writers(target, plan, undo)
        swap_norms(target, plan, undo)
        fused = fuse_affine_(target, plan, cap.graph, cap.placeholders, undo) if fuse_affine else []
        error = None
        if check:
            got = run(target, example_inputs, example_kwargs)
            error = max_relative_error(ref, got)
            limit = tol if tol is not None else max(tolerance(ref), 3 * noise)
            if not error <= limit:
                raise FoldCheckError(
                    error,
                    limit,
                    f"the folded {type(model).__name__} differs from the original by {error:.3g} (relative to the "
                    f"output RMS; tolerance {limit:.3g}). This is a bug in the analysis: please report it with "
                    "the model; fold(check=False) skips the check at your own risk.",
                )
    except Exception:
        if inplace:
            undo.rollback()
        raise
    target.cbwc_plan = plan
    target.cbwc_fused = fused
    target.cbwc_max_error = error
    return target
