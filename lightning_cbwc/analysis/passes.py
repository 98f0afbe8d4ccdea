"""analyze(): which LayerNorms of a model fold into RMSNorm, decided on its torch.export graph.

Two forward passes over the ATen graph, both driven by the op table in ``rules``:
1. zero-mean: which tensors become zero-mean over which dims once their writers are centered;
   a LayerNorm whose input is zero-mean over exactly its normalized dims is a candidate.
2. shift: centering the candidates' writers changes their outputs by a per-sample shift; follow it
   forward.  It may only end at LayerNorms where it is uniform over the normalized dims.  Where it
   escapes (a head, an attention score, the output, a tied use), the candidates that need those writers
   are dropped, and the pass repeats until nothing changes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn

from ..centering import CenteredEmbedding
from .captured import Captured, capture, module_path, nested_calls, tensor_shape
from .context import Context
from .facts import Broken, Centered, Free, Shift, merge_shifts
from .plan import FoldPlan, NormSite, Writer
from .rules import LayerNormOp, resolve_free, rule_for
from .swap import LAYER_NORM_OPS, swap_kind, traced_layout

aten = torch.ops.aten
#: the ops an nn.Embedding subclass's forward may run for its lookups to be centered at its output
SCALED_LOOKUP = (aten.embedding.default, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)


class _Analysis:
    def __init__(self, cap: Captured) -> None:
        self.cap = cap
        self.model = cap.model
        self.nodes = list(cap.graph.nodes)
        self.by_name = {n.name: n for n in self.nodes}
        self.facts: dict[fx.Node, Any] = {}
        self.unsafe: dict[str, str] = {}
        self.scales: set[str] = set()
        #: LayerScale -> its uses as a writer's scale (the mul -> the writer's params)
        self.scale_uses: dict[str, dict[fx.Node, frozenset[str]]] = {}
        #: module path -> the ops it ran (built when first asked); norm site -> layout of its normalized dims
        self._inside: dict[str, list[fx.Node]] | None = None
        self.layouts: dict[str, str] = {}
        self._names: dict[tuple[str, str], str] = {}
        self.canonical_names: dict[int, str] = {}
        self.aliases: dict[str, list[str]] = {}
        for name, module in self.model.named_modules(remove_duplicate=False):
            first = self.canonical_names.setdefault(id(module), name)
            if first != name:
                self.aliases.setdefault(first, []).append(name)
        self._tensors = {
            **dict(self.model.named_parameters(remove_duplicate=False)),
            **dict(self.model.named_buffers(remove_duplicate=False)),
        }

    def param_name(self, placeholder: fx.Node, module: str) -> str:
        """The qualified name of a placeholder's tensor, as seen from ``module`` when it owns it (ties)."""
        key = (placeholder.name, module)
        if key not in self._names:
            fqn = self.cap.placeholders.get(placeholder.name, ("", placeholder.name))[1]
            name = fqn
            tensor = self._tensors.get(fqn)
            if module and tensor is not None:
                try:
                    mod = self.model.get_submodule(module)
                except AttributeError:
                    mod = None
                if mod is not None:
                    own = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
                    for attr, t in own:
                        if t is tensor:
                            name = f"{module}.{attr}"
                            break
            self._names[key] = name
        return self._names[key]

    # ---------------------------------------------------------------- pass 1: zero-mean
    def zero_mean_pass(self) -> None:
        for n in self.nodes:
            if n.op == "placeholder":
                role, fqn = self.cap.placeholders.get(n.name, ("input", n.name))
                shape = tensor_shape(n)
                if role in ("parameter", "buffer") and shape is not None and len(shape) > 0:
                    opts = frozenset((n.name, d, frozenset({d})) for d in range(len(shape)))
                    self.facts[n] = Free(opts)
                elif role in ("parameter", "buffer"):
                    self.facts[n] = Broken(f"the 0-d {role} {fqn} is constant along every dim (not centered)")
                elif role == "constant":
                    self.facts[n] = Broken(f"the tensor constant {fqn} is not centered")
                else:
                    self.facts[n] = Broken(f"the model input `{fqn}` is not centered")
            elif n.op == "call_function":
                ctx = Context(self, n)
                try:
                    self.facts[n] = rule_for(n.target).zero_mean(ctx)
                except (IndexError, TypeError, ValueError, KeyError, AttributeError) as exc:
                    self.facts[n] = Broken(f"{ctx.op} {ctx.where} could not be analyzed ({exc})")
            elif n.op != "output":
                self.facts[n] = Broken(f"{n.op} {n.name} is not analyzed")

    # ---------------------------------------------------------------- pass 2: shift
    def shift_pass(self, writers: set[Writer]) -> None:
        self.unsafe = {}
        self.scales = {w.scale for w in writers if w.scale}
        shifts: dict[fx.Node, Any] = {}
        lookup_modules = {self.canonical(w.module): w.param for w in writers if w.kind == "embedding_lookup"}
        centered_params = {w.param: w for w in writers if w.kind != "embedding_lookup"}
        for n in self.nodes:
            if n.op == "placeholder":
                names = {self.param_name(n, "")} | {self.param_name(n, module_path(u)[0]) for u in n.users}
                hits = [centered_params[x] for x in names if x in centered_params]
                if hits:
                    shifts[n] = Shift(frozenset({hits[0].dim}), frozenset(w.param for w in hits))
            elif n.op == "call_function":
                ctx = Context(self, n, shifts)
                try:
                    s = rule_for(n.target).shift(ctx)
                except (IndexError, TypeError, ValueError, KeyError, AttributeError) as exc:
                    ctx.escape(
                        merge_shifts([x for x in ctx.input_shifts() if isinstance(x, Shift)]), str(exc)
                    )
                    s = None
                module = self.canonical(ctx.module)
                if n.target is aten.embedding.default and module in lookup_modules:
                    seed = Shift(frozenset({len(ctx.out_shape) - 1}), frozenset({lookup_modules[module]}))
                    s = merge_shifts([s, seed])
                if s is not None:
                    shifts[n] = s
            elif n.op == "output":
                ctx = Context(self, n, shifts)
                for s in ctx.input_shifts():
                    ctx.escape(s, "the centering shift reaches the model's output")
        self.shifts = shifts

    # ---------------------------------------------------------------- candidates
    def norm_candidates(self) -> tuple[dict[str, list[fx.Node]], dict[fx.Node, Any]]:
        """LN nodes grouped by module, and per node: the writers it needs, or the reason it cannot fold."""
        groups: dict[str, list[fx.Node]] = {}
        verdict: dict[fx.Node, Any] = {}
        counter = 0
        for n in self.nodes:
            if n.op != "call_function" or n.target not in LAYER_NORM_OPS:
                continue
            path, typ = module_path(n)
            try:
                module = self.model.get_submodule(path) if path else self.model
            except AttributeError:
                module = None
            path = self.canonical(path)  # one module under several names: one site
            kind = swap_kind(module) if module is not None else None
            if kind is None and isinstance(module, nn.LayerNorm):
                kind = traced_layout(module, self._ops_inside(path), self._tensor_of)
            if kind is None:
                counter += 1
                name = f"{path or '<root>'}::layer_norm#{counter}"
                groups.setdefault(name, []).append(n)
                verdict[n] = (
                    f"the forward of {typ} {path} does more than its own layer_norm (or moves the channels last "
                    "and back): no RMSNorm computes the same"
                    if isinstance(module, nn.LayerNorm)
                    else f"layer_norm called inside {typ or type(self.model).__name__} {path or '(root)'}, not by "
                    "a LayerNorm module that can be swapped for RMSNorm"
                )
                continue
            groups.setdefault(path, []).append(n)
            self.layouts[path] = kind
            ctx = Context(self, n)
            fact = self.facts.get(n.args[0])
            normed = LayerNormOp().normalized_axes(ctx)
            if isinstance(fact, Free):
                writers = resolve_free(fact, normed, ctx)
                fact = Centered(normed, writers) if writers else Broken("a parameter that cannot be centered")
            if isinstance(fact, Centered):
                if fact.axes == normed:
                    verdict[n] = set(fact.writers)
                else:
                    verdict[n] = (
                        f"its input is zero-mean over dims {sorted(fact.axes)} of the tensor, but it normalizes "
                        f"over dims {sorted(normed)}: the centering shift would not be uniform"
                    )
            elif isinstance(fact, Broken):
                verdict[n] = fact.reason
            else:
                verdict[n] = "its input is not a tensor the analysis understands"
        return groups, verdict

    def _ops_inside(self, path: str) -> list[fx.Node]:
        """Every op the module at canonical ``path`` ran, in any of its calls (its children's ops included)."""
        if self._inside is None:
            names = functools.cache(self.canonical)
            self._inside = {}
            for n in self.nodes:
                if n.op == "call_function":
                    for p in {names(p) for p, _ in (n.meta.get("nn_module_stack") or {}).values()}:
                        self._inside.setdefault(p, []).append(n)
        return self._inside.get(path, [])

    def _tensor_of(self, node: fx.Node) -> torch.Tensor | None:
        """The parameter or buffer a placeholder holds, else None."""
        role, fqn = self.cap.placeholders.get(node.name, ("", ""))
        return self._tensors.get(fqn) if role in ("parameter", "buffer") else None

    def _drop_partial_scales(
        self, site_writers: dict[str, set[Writer]], all_writers: set[Writer], reasons: dict[str, str]
    ) -> bool:
        """A LayerScale folds into its writers and becomes 1: every use of it must scale a writer that is
        centered.  Give the sites that would fold one only in part a reason; True if any."""
        centered = {w.param for w in all_writers}
        changed = False
        for name, ws in site_writers.items():
            for scale in sorted({w.scale for w in ws if w.scale}):
                uses = self.scale_uses.get(scale, {})
                left = sorted(p for params in uses.values() for p in params if p not in centered)
                if len(uses) != sum(len(ph.users) for ph in self._placeholders_of(scale)):
                    reasons[name] = f"the LayerScale {scale} is also used other than right after a writer"
                elif left:
                    reasons[name] = (
                        f"the LayerScale {scale} also scales {left[0]}, which no folded norm centers"
                    )
                else:
                    continue
                changed = True
                break
        return changed

    def lookup_mode(self, writers: Iterable[Writer]) -> set[Writer]:
        """Embedding tables used by anything other than lookups are centered at the lookup instead."""
        out = set()
        for w in writers:
            if w.kind == "embedding" and self._is_embedding_module(w.module):
                users = [u for ph in self._placeholders_of(w.param) for u in ph.users]
                if any(u.target is not aten.embedding.default for u in users):
                    w = Writer(w.param, w.dim, "embedding_lookup", w.module, w.scale)
            out.add(w)
        return out

    def _is_embedding_module(self, path: str) -> bool:
        """True when ``path`` is an nn.Embedding whose lookups fold can center: a plain one (CenteredEmbedding),
        or a subclass whose forward is the lookup times scalars (BART's, BioGPT's scaled embeddings), whose
        output a hook centers."""
        try:
            module = self.model.get_submodule(path) if path else None
        except AttributeError:
            return False
        if type(module) in (nn.Embedding, CenteredEmbedding):
            return True
        if not isinstance(module, nn.Embedding):
            return False
        inside = [n for n in self.nodes if n.op == "call_function" and module_path(n)[0] == path]
        return all(
            n.target is aten.embedding.default
            or (
                n.target in SCALED_LOOKUP
                and all(tensor_shape(a) in (None, ()) for a in n.args[1:] if isinstance(a, fx.Node))
            )
            for n in inside
        )

    def _placeholders_of(self, param: str) -> list[fx.Node]:
        """Every placeholder holding the tensor named ``param`` (tied tensors may have several)."""
        tensor = self._tensors.get(param)
        return [
            self.by_name[name]
            for name, (role, fqn) in self.cap.placeholders.items()
            if role in ("parameter", "buffer") and (fqn == param or self._tensors.get(fqn) is tensor)
        ]

    def canonical(self, path: str) -> str:
        """The first registered name of the module at ``path`` (one module may sit under several names)."""
        try:
            module = self.model.get_submodule(path) if path else self.model
        except AttributeError:
            return path
        return self.canonical_names.get(id(module), path)

    def nested_norms(self) -> dict[str, str]:
        """LayerNorm modules called inside higher-order regions the passes do not enter: site -> reason.  A
        call without a module path (cond branches) is pinned on the modules whose parameters enter the region."""
        out: dict[str, str] = {}
        for node, region, outer in nested_calls(self.cap, LAYER_NORM_OPS):
            why = (
                f"it is also called inside a higher-order region ({region}: torch.cond, an autocast or grad-mode "
                "block, ...) that the analysis does not enter"
            )
            path = module_path(node)[0]
            if path:
                out.setdefault(self.canonical(path), why)
                continue
            for inp in outer.all_input_nodes:
                role, fqn = self.cap.placeholders.get(inp.name, ("", ""))
                if role == "parameter" and "." in fqn:
                    out.setdefault(self.canonical(fqn.rpartition(".")[0]), why)
        return out

    def run(self, keep: Mapping[str, str] | None = None, replace: str = "foldable") -> FoldPlan:
        self.zero_mean_pass()
        groups, verdict = self.norm_candidates()
        reasons: dict[str, str] = {name: why for name, why in (keep or {}).items() if name in groups}
        for name, why in self.nested_norms().items():
            if name in groups:
                reasons.setdefault(name, why)
        for name, lns in groups.items():
            bad = [verdict[n] for n in lns if isinstance(verdict[n], str)]
            if bad:
                reasons[name] = bad[0]
        # the fixpoint: drop candidates whose writers' shift escapes, until none does
        while True:
            chosen = {name: lns for name, lns in groups.items() if name not in reasons}
            site_writers = {
                name: self.lookup_mode(set().union(*(verdict[n] for n in lns)))
                for name, lns in chosen.items()
            }
            all_writers = set().union(*site_writers.values()) if site_writers else set()
            changed = self._drop_partial_scales(site_writers, all_writers, reasons)
            if changed:
                continue
            if replace == "all":  # the model trains under the centering: an escaping shift blocks nothing
                break
            self.shift_pass(all_writers)
            for name, ws in site_writers.items():
                hit = sorted(w.param for w in ws if w.param in self.unsafe)
                if hit:
                    reasons[name] = f"centering {hit[0]} would change the model: {self.unsafe[hit[0]]}"
                    changed = True
            if not changed:
                break
        sites = []
        for name, lns in groups.items():
            first = lns[0]
            path, typ = module_path(first)
            ws = sorted(site_writers.get(name, ()), key=lambda w: (w.param, w.dim))
            sites.append(
                NormSite(
                    name=name,
                    kind="layer_norm",
                    normalized_shape=tuple(int(s) for s in first.args[1]),
                    foldable=name not in reasons,
                    reason=reasons.get(name),
                    writers=ws if name not in reasons else [],
                    module_type=typ,
                    layout=self.layouts.get(name, "channels_last"),
                    aliases=self.aliases.get(name, []),
                    approximate=replace == "all" and name in reasons and "::layer_norm#" not in name,
                )
            )
        return FoldPlan(sites=sites, model_type=type(self.model).__name__)


REPLACE = ("foldable", "all")


def analyze_captured(
    cap: Captured, keep: Mapping[str, str] | None = None, replace: str = "foldable"
) -> FoldPlan:
    """Run the analysis on a graph already captured by :func:`capture`; the sites named in ``keep`` are not
    exact, with the given reason (their writers are then centered only where other sites need them).

    ``replace="all"`` (training from scratch): shifts that escape (tied heads, outputs) do not block centering,
    and every swappable LayerNorm that is not exact is marked ``approximate``."""
    if replace not in REPLACE:
        raise ValueError(f"replace must be one of {REPLACE}, got {replace!r}")
    return _Analysis(cap).run(keep, replace)


def analyze(
    model: nn.Module,
    example_inputs: Any,
    example_kwargs: dict[str, Any] | None = None,
    *,
    replace: str = "foldable",
) -> FoldPlan:
    """Find the LayerNorms of ``model`` that fold into RMSNorm after centering their writers.

    ``example_inputs`` (a tuple of positional args, or one tensor) and ``example_kwargs`` are what the
    model is called with; the model is captured with torch.export in eval mode and left unchanged.
    ``replace="all"``: the plan :func:`~lightning_cbwc.convert` follows with that setting.
    """
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    return analyze_captured(capture(model, example_inputs, example_kwargs), replace=replace)
