"""Model surgery over (model, plan): replace modules, center writers, swap norms, fuse affines, undo.

Small functions shared by :func:`lightning_cbwc.fold` and :func:`lightning_cbwc.convert`; every change goes
through an :class:`Undo`, so a failed check puts the model back as it was.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .analysis import FoldPlan
from .analysis.captured import module_path
from .analysis.swap import swap_kind
from .centering import CenteredEmbedding, center_, center_lookup_output, centers_lookup_output, fold_scale_
from .errors import FoldingError
from .norm import RMSNorm, RMSNorm2d

log = logging.getLogger("lightning_cbwc")
aten = torch.ops.aten


@dataclass
class Undo:
    """What a fold or a conversion changed, so that a failure can put the model back as it was."""

    steps: list[Callable[[], None]] = field(default_factory=list)

    def tensor(self, t: torch.Tensor) -> None:
        saved = t.detach().clone()
        self.steps.append(lambda: t.data.copy_(saved))

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        old = getattr(obj, name)
        self.steps.append(lambda: setattr(obj, name, old))
        setattr(obj, name, value)

    def call(self, step: Callable[[], None]) -> None:
        """Run ``step`` on rollback (after the steps recorded later, before the earlier ones)."""
        self.steps.append(step)

    def rollback(self) -> None:
        with torch.no_grad():
            for step in reversed(self.steps):
                step()
        self.steps = []

    @contextlib.contextmanager
    def on_error(self) -> Iterator[Undo]:
        """Roll back everything recorded inside the block if it raises, then re-raise."""
        try:
            yield self
        except BaseException:
            self.rollback()
            raise


def stored_tensor(model: nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_buffer(name)


#: the per-module hook tables a replacement module takes over (shared, so the user's handles still remove them)
HOOK_TABLES = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module, undo: Undo) -> None:
    """Put ``new`` wherever ``old`` is registered (a shared module may sit under several names).

    ``new`` takes over ``old``'s train/eval flag, its forward, backward and state-dict hooks (a user's hook,
    HF's gradient-checkpointing hook on the input embeddings) and the instance attributes it does not define
    itself (not an instance-level ``forward``, which would run the old module), so the model behaves as
    before but for the swap.
    """
    new.training = old.training
    for table in HOOK_TABLES:
        setattr(new, table, getattr(old, table))
    new._is_full_backward_hook = old._is_full_backward_hook
    for key, value in old.__dict__.items():
        if key not in new.__dict__ and key != "forward":
            new.__dict__[key] = value
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is old:
                undo.setattr(parent, name, new)


def center_lookups(
    model: nn.Module, plan: FoldPlan, undo: Undo | None = None, zero_mean_grad: bool = False
) -> None:
    """Every table the plan centers at the lookup (tied elsewhere) becomes a :class:`CenteredEmbedding`
    holding the same Parameter, the table itself left as it is; an ``nn.Embedding`` subclass with its own
    forward (a scaled lookup) keeps its class and gets its output centered by a forward hook instead.
    ``zero_mean_grad``: the rows' gradient is zero-mean by construction (CBWC training, every norm exact)."""
    undo = undo or Undo()
    for w in plan.writers:
        if w.kind != "embedding_lookup":
            continue
        emb = model.get_submodule(w.module)
        if isinstance(emb, CenteredEmbedding) or centers_lookup_output(emb):
            continue
        if type(emb) is nn.Embedding:
            new = CenteredEmbedding.adopt(emb)
            new.zero_mean_grad = zero_mean_grad
            replace_module(model, emb, new, undo)
        elif isinstance(emb, nn.Embedding):
            handle = emb.register_forward_hook(center_lookup_output)
            undo.call(handle.remove)
        else:
            raise FoldingError(
                f"{w.module} is a {type(emb).__name__}, not an nn.Embedding: cannot center it at the lookup"
            )


def center_writers(model: nn.Module, plan: FoldPlan, undo: Undo | None = None) -> None:
    """Center every writer of the plan's foldable norms; fold LayerScales first; center tied tables at lookup."""
    undo = undo or Undo()
    center_lookups(model, plan, undo)
    scales = {}
    for w in plan.writers:
        if w.kind == "embedding_lookup":
            continue
        t = stored_tensor(model, w.param)
        undo.tensor(t)
        if w.scale:
            g = stored_tensor(model, w.scale)
            fold_scale_(t, g, w.dim)
            scales[w.scale] = g
        center_(t, w.dim)
    for g in scales.values():
        undo.tensor(g)
        with torch.no_grad():
            g.fill_(1)


def swap_norms(model: nn.Module, plan: FoldPlan, undo: Undo | None = None) -> dict[str, RMSNorm]:
    """Replace each LayerNorm module the plan swaps (foldable or approximate) by an RMSNorm adopting its weight,
    bias and eps."""
    undo = undo or Undo()
    swapped = {}
    for site in plan.swapped:
        ln = model.get_submodule(site.name)
        kind = swap_kind(ln) or (site.layout if isinstance(ln, nn.LayerNorm) else None)
        if kind is None:
            raise FoldingError(
                f"{site.name} is a {type(ln).__name__}: no RMSNorm replacement is known for it"
            )
        norm = (RMSNorm2d if kind == "channels_first" else RMSNorm).from_layer_norm(ln, site.foldable)
        replace_module(model, ln, norm, undo)
        swapped[site.name] = norm
    return swapped


def swap_every_norm(model: nn.Module) -> list[str]:
    """The plain-RMSNorm baseline: every LayerNorm with a known RMSNorm replacement swapped (same weight, bias
    and eps), nothing centered, no capture needed.  This changes the model's function (RMSNorm does not remove
    the mean); it is what people pick instead of LayerNorm, the comparison CBWC has to win.  Returns the names."""
    undo = Undo()
    names = []
    for name, module in list(model.named_modules(remove_duplicate=True)):
        kind = swap_kind(module)
        if kind is None:
            continue
        norm = (RMSNorm2d if kind == "channels_first" else RMSNorm).from_layer_norm(
            module, centered_input=False
        )
        replace_module(model, module, norm, undo)
        names.append(name)
    return names


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


def _private(arg: Any) -> bool:
    """True for no tensor, or a graph input used by one node only (so rewriting it changes nothing else)."""
    return not isinstance(arg, fx.Node) or len(arg.users) == 1


@torch.no_grad()
def fuse_affine_(
    model: nn.Module, plan: FoldPlan, graph: fx.Graph, placeholders: dict, undo: Undo
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
        if not consumers or not all(_private(a) for a in lns[0].args[2:4]):
            continue  # the norm's gamma / beta are read elsewhere too: they must stay
        targets = []
        for node in consumers:
            _, w_arg, b_arg, in_dim = _AFFINE_CONSUMERS[node.target]
            w = node.args[w_arg]
            b = node.args[b_arg] if b_arg is not None and b_arg < len(node.args) else None
            path = module_path(node)[0]
            mod = model.get_submodule(path) if path else None
            ok = (
                mod is not None
                and isinstance(w, fx.Node)
                and w.op == "placeholder"
                and _private(w)
                and _private(b)
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
