"""The op table: how each ATen op carries the zero-mean fact and the centering shift.

One rule per op family; ``RULES`` maps every known op to its rule.  An op not in the table breaks the
zero-mean fact and stops any shift that reaches it (an escape): unknown ops are never assumed transparent.

Each rule answers two questions about one node:
  zero_mean(ctx) -> Fact         is the output zero-mean once the writers are centered?
  shift(ctx)     -> Shift | None how does centering the chosen writers change the output?
                                  (calls ctx.escape(...) where the change would reach the model's function)
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import axes as ax
from .facts import Broken, Centered, Fact, Free, Multi, Shift, merge_shifts

aten = torch.ops.aten

# ---------------------------------------------------------------------------------------------- helpers


def _is_node(a: Any) -> bool:
    return hasattr(a, "op") and hasattr(a, "users")


def map_fact(fact: Fact | None, mapper: Callable[[ax.Axes], ax.Axes | None], why: str) -> Fact | None:
    """Carry a fact through an op that moves axes with ``mapper``."""
    if isinstance(fact, Centered):
        new = mapper(fact.axes)
        return Centered(new, fact.writers) if new else Broken(why)
    if isinstance(fact, Free):
        opts = set()
        for ph, dim, axes in fact.options:
            new = mapper(axes)
            if new is not None:
                opts.add((ph, dim, new))
        return Free(frozenset(opts)) if opts else Broken(why)
    return fact


def map_shift(shift: Shift | None, mapper: Callable[[ax.Axes], ax.Axes | None]) -> Shift | None:
    if shift is None:
        return None
    new = mapper(shift.axes) if shift.axes is not None else None
    return Shift(new or None, shift.writers)


def resolve_free(free: Free, axes: ax.Axes, ctx) -> frozenset | None:
    """Writers that center every parameter of ``free`` over ``axes``, or None if one of them cannot be."""
    by_param: dict[str, list[tuple[int, ax.Axes]]] = {}
    for ph, dim, a in free.options:
        by_param.setdefault(ph, []).append((dim, a))
    writers = set()
    for ph, opts in by_param.items():
        match = [dim for dim, a in opts if a == axes]
        if not match:
            return None
        writers.add(ctx.param_writer(ph, match[0]))
    return frozenset(writers)


def combine_sum(facts: list[Fact], ctx, what: str) -> Fact:
    """The zero-mean fact of a sum (add, sub, cat pieces): every term centered over the same axes."""
    centered = [f for f in facts if isinstance(f, Centered)]
    for f in facts:
        if isinstance(f, Broken):
            return f
        if f is None or f == "scalar":
            return Broken(f"{what} adds a tensor that is not centered ({ctx.where})")
    if not centered:
        frees = [f for f in facts if isinstance(f, Free)]
        return Free(frozenset().union(*(f.options for f in frees)))
    axes = centered[0].axes
    if any(c.axes != axes for c in centered[1:]):
        return Broken(f"{what} sums tensors centered over different dims ({ctx.where})")
    writers = frozenset().union(*(c.writers for c in centered))
    for f in facts:
        if isinstance(f, Free):
            extra = resolve_free(f, axes, ctx)
            if extra is None:
                return Broken(f"{what} adds a parameter that does not span the centered dim ({ctx.where})")
            writers |= extra
    return Centered(axes, writers)


# ---------------------------------------------------------------------------------------------- rules


class Rule:
    """Default: breaks the zero-mean fact; a shift reaching it escapes into the model's function."""

    why = "is not mean-preserving"

    def zero_mean(self, ctx) -> Fact:
        return Broken(f"{ctx.op} {ctx.where} {self.why}")

    def shift(self, ctx) -> Shift | None:
        shifts = [s for s in ctx.input_shifts() if s is not None]
        if shifts:
            ctx.escape(merge_shifts(shifts), f"the centering shift reaches {ctx.op} {ctx.where}")
        return None


class Breaks(Rule):
    """Ops that are known to break the fact (activations, softmax, attention, norms' outputs...)."""

    def __init__(self, why: str) -> None:
        self.why = why


class Ignore(Rule):
    """Ops without tensor outputs (asserts, shape queries): no fact, no shift."""

    def zero_mean(self, ctx) -> Fact | None:
        return None

    def shift(self, ctx) -> Shift | None:
        return None


class Fresh(Rule):
    """Ops that read only their input's shape, dtype and device (``x.new_empty``, ``zeros_like``...): a
    new tensor, not centered, that no shift reaches (timm's drop-path draws its per-sample mask this way)."""

    why = "makes a fresh tensor (not centered)"

    def shift(self, ctx) -> Shift | None:
        return None


class AxisMap(Rule):
    """View-like unary ops on the first argument: move axes, and break when the op mixes the tracked axes.
    ``zero_mean_mapper``: a more permissive mapper for zero-mean facts (the shift pass keeps ``mapper``)."""

    def __init__(
        self,
        mapper: Callable[[Any, ax.Axes], ax.Axes | None],
        why: str,
        zero_mean_mapper: Callable[[Any, ax.Axes], ax.Axes | None] | None = None,
    ) -> None:
        self.mapper = mapper
        self.why = why
        self.zero_mean_mapper = zero_mean_mapper or mapper

    def zero_mean(self, ctx) -> Fact:
        return map_fact(
            ctx.fact(ctx.args[0]), lambda a: self.zero_mean_mapper(ctx, a), f"{ctx.op} {ctx.where} {self.why}"
        )

    def shift(self, ctx) -> Shift | None:
        others = [s for s in ctx.input_shifts()[1:] if s is not None]
        if others:
            ctx.escape(
                merge_shifts(others), f"the centering shift reaches an argument of {ctx.op} {ctx.where}"
            )
        return map_shift(ctx.shift(ctx.args[0]), lambda a: self.mapper(ctx, a))


def _identity(ctx, a):
    return a


def _reshape(ctx, a):
    return ax.map_reshape(a, ctx.shape(ctx.args[0]), ctx.out_shape)


def _merging_reshape(ctx, a):
    return ax.map_reshape(a, ctx.shape(ctx.args[0]), ctx.out_shape, merge=True)


def _permute(ctx, a):
    return ax.map_permute(a, ctx.args[1])


def _transpose(ctx, a):
    return ax.map_transpose(a, ctx.args[1], ctx.args[2], len(ctx.out_shape))


def _t(ctx, a):
    return ax.map_transpose(a, 0, 1, 2) if len(ctx.out_shape) == 2 else a


def _reverse(ctx, a):
    rank = len(ctx.out_shape)
    return frozenset(rank - 1 - x for x in a)


def _movedim(ctx, a):
    rank = len(ctx.out_shape)
    src = ctx.args[1] if isinstance(ctx.args[1], Sequence) else [ctx.args[1]]
    dst = ctx.args[2] if isinstance(ctx.args[2], Sequence) else [ctx.args[2]]
    src = [ax.norm_dim(s, rank) for s in src]
    dst = [ax.norm_dim(d, rank) for d in dst]
    rest = [i for i in range(rank) if i not in src]
    perm = [-1] * rank
    for s, d in zip(src, dst, strict=True):
        perm[d] = s
    it = iter(rest)
    perm = [p if p >= 0 else next(it) for p in perm]
    return ax.map_permute(a, perm)


def _expand(ctx, a):
    src, dst = ctx.shape(ctx.args[0]), ctx.out_shape
    out = ax.map_right_aligned(a, len(src), len(dst))
    shift = len(dst) - len(src)
    if any(src[x] != dst[x + shift] for x in a):
        return None
    return out


def _dim_untouched(dim_arg: int):
    def mapper(ctx, a):
        rank = len(ctx.shape(ctx.args[0]))
        dim = ctx.arg(dim_arg, 0)
        return None if ax.norm_dim(dim, rank) in a else a

    return mapper


def _select(ctx, a):
    rank = len(ctx.shape(ctx.args[0]))
    return ax.map_remove(a, [ctx.args[1]], rank)


def _slice(ctx, a):
    rank = len(ctx.shape(ctx.args[0]))
    dim = ctx.arg(1, 0)
    src = ctx.shape(ctx.args[0])
    d = ax.norm_dim(dim, rank)
    if d in a and src[d] != ctx.out_shape[d]:
        return None
    return a


def _index(ctx, a):
    indices = ctx.args[1]
    src = ctx.shape(ctx.args[0])
    last = max((i for i, t in enumerate(indices) if t is not None), default=-1)
    if any(x <= last for x in a):
        return None
    return frozenset(x + len(ctx.out_shape) - len(src) for x in a)


def _pad_constant(ctx) -> Any:
    """The nonzero constant a constant pad writes, or None (zeros, or a reflect / replicate pad)."""
    value = ctx.arg(2, 0) if ctx.node.target is aten.constant_pad_nd.default else ctx.arg(3, None, "value")
    mode = ctx.arg(2, "constant", "mode") if ctx.node.target is aten.pad.default else "constant"
    return value if mode == "constant" and value not in (0, 0.0, None) else None


def _pad(ctx, a):
    if _pad_constant(ctx) is not None:
        return None  # the padded positions hold a constant: not zero-mean
    pad = list(ctx.args[1])
    rank = len(ctx.shape(ctx.args[0]))
    padded = {rank - 1 - i // 2 for i in range(len(pad)) if pad[i] != 0}
    return None if a & padded else a


def _roll(ctx, a):
    """roll along given dims permutes the elements of each fibre, or the fibres: every fibre keeps its mean
    (and a uniform shift stays uniform); a roll of the flattened tensor mixes fibres."""
    dims = ctx.arg(2, [])
    dims = [dims] if isinstance(dims, int) else list(dims)
    return a if dims else None


def _along_other_dim(dim_arg: int):
    """An op working along one dim (cumsum, index_select): other dims keep their facts, the centered one breaks."""

    def mapper(ctx, a):
        rank = len(ctx.shape(ctx.args[0]))
        return None if ax.norm_dim(ctx.arg(dim_arg, 0), rank) in a else a

    return mapper


# Ops on a gather index that keep it constant along a dim where their source is: broadcasts from size 1,
# and elementwise copies (``ids_restore.unsqueeze(-1).repeat(1, 1, d).to(device)`` in ViT-MAE's decoder).
_INDEX_SEEN_THROUGH = (
    aten.expand.default,
    aten.expand_as.default,
    aten.repeat.default,
    aten._to_copy.default,
    aten.to.device,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten.clone.default,
    aten.contiguous.default,
)


def _gather(ctx, a):
    """gather along a dim other than the centered ones, with an index constant along them and as wide as the
    rows (ViT-MAE's token shuffle, MoE dispatch: whole rows picked), keeps every picked row's mean.  The index
    is seen through :data:`_INDEX_SEEN_THROUGH` back to where it is constant along the centered dims."""
    source = ctx.shape(ctx.args[0])
    if len(ctx.out_shape) != len(source) or any(ctx.out_shape[d] != source[d] for d in a):
        return None  # an index narrower than the rows picks part of each row
    index = ctx.arg(2)
    while _is_node(index) and index.target in _INDEX_SEEN_THROUGH:
        index = index.args[0]  # expanded or repeated from size 1 along a dim, or moved: constant along it
    if ax.norm_dim(ctx.arg(1, 0), len(source)) in a or not ctx.constant_along(index, a):
        return None
    return a


def _spatial_resample(ctx, a):
    """Interpolation over the spatial dims (2, ...) of an (N, C, ...) tensor: each output pixel is one
    weighted sum of input pixels with the same weights for every channel, so zero-mean channels stay so."""
    return None if any(x >= 2 for x in a) else a


def _reduce(ctx, a):
    src = ctx.shape(ctx.args[0])
    dims = ctx.arg(1, None)
    keepdim = ctx.arg(2, False, "keepdim")
    if dims is None or (isinstance(dims, Sequence) and len(dims) == 0):
        return None
    dims = [dims] if isinstance(dims, int) else list(dims)
    if keepdim:
        return None if a & {ax.norm_dim(d, len(src)) for d in dims} else a
    return ax.map_remove(a, dims, len(src))


def _pool(spatial: int):
    def mapper(ctx, a):
        rank = len(ctx.shape(ctx.args[0]))
        pooled = set(range(rank - spatial, rank))
        return None if a & pooled else a

    return mapper


def _repeat(ctx, a):
    """repeat tiles whole fibres: along a centered dim each fibre is its own values k times (same mean)."""
    src, reps = ctx.shape(ctx.args[0]), list(ctx.args[1])
    return frozenset(x + len(reps) - len(src) for x in a)


class Pad(AxisMap):
    """A pad of zeros along other dims keeps the fact; padding the centered dim breaks it, and so does a nonzero
    constant along any dim (the padded positions are that constant, not zero-mean): each with its own reason."""

    def __init__(self) -> None:
        super().__init__(_pad, "pads the centered dim")

    def zero_mean(self, ctx) -> Fact:
        value = _pad_constant(ctx)
        if value is not None and isinstance(ctx.fact(ctx.args[0]), Centered | Free):
            return Broken(
                f"{ctx.op} {ctx.where} pads with the constant {value}: the padded positions are not zero-mean"
            )
        return super().zero_mean(ctx)


class Dropout(AxisMap):
    """Dropout in eval mode (or p = 0) is the identity; in training mode it scales per element."""

    def __init__(self) -> None:
        super().__init__(_identity, "")

    def _active(self, ctx) -> bool:
        p, train = ctx.arg(1, 0.0), ctx.arg(2, False)
        return bool(train) and p > 0

    def zero_mean(self, ctx) -> Fact:
        if self._active(ctx):
            return Broken(
                f"dropout (p={ctx.arg(1, 0.0)}) {ctx.where} is active: its per-element mask de-centers the input "
                "(in eval mode it is the identity)"
            )
        return super().zero_mean(ctx)

    def shift(self, ctx) -> Shift | None:
        if self._active(ctx):
            return Rule.shift(self, ctx)
        return super().shift(ctx)


def _explicit_centering(ctx) -> ax.Axes | None:
    """The dims of ``h - h.mean(dims, keepdim=True)`` (zero-mean over them whatever ``h`` is), else None."""
    if ctx.node.target is not aten.sub.Tensor or ctx.kwargs.get("alpha", 1) != 1 or len(ctx.args) < 2:
        return None
    h, m = ctx.args[0], ctx.args[1]
    if not (_is_node(m) and m.target is aten.mean.dim and m.args[0] is h and len(m.args) > 2 and m.args[2]):
        return None
    rank = len(ctx.shape(h) or ())
    if rank == 0 or ctx.shape(h) != ctx.out_shape or not m.args[1]:
        return None
    return frozenset(ax.norm_dim(d, rank) for d in m.args[1])


class AddSub(Rule):
    """add/sub: a sum of tensors centered over the same axes stays centered; shifts add up.  An explicit
    ``h - h.mean(dims, keepdim=True)`` is zero-mean over ``dims`` with no writer, and removes a shift uniform
    over them."""

    def zero_mean(self, ctx) -> Fact:
        dims = _explicit_centering(ctx)
        if dims is not None:
            return Centered(dims, frozenset())
        aligned = [self._align(ctx, a) for a in ctx.args[:2]]
        return combine_sum([f for f in aligned if f is not None], ctx, ctx.op)

    def _align(self, ctx, a):
        f = ctx.fact(a)
        if f is None and _is_node(a):
            return Broken(f"{ctx.op} {ctx.where} adds an operand the analysis does not understand")
        if f == "scalar":
            return None if ctx.is_zero_scalar(a) else Broken(f"{ctx.op} {ctx.where} adds a constant")
        shape = ctx.shape(a)
        if shape is None:
            return f
        return map_fact(
            f,
            lambda x: self._broadcast(x, shape, ctx.out_shape),
            f"{ctx.op} {ctx.where} broadcasts the centered dim",
        )

    @staticmethod
    def _broadcast(axes, shape, out_shape):
        # A size-1 operand axis broadcast along a centered axis is zeroed by its centering: still exact.
        return ax.map_right_aligned(axes, len(shape), len(out_shape))

    def shift(self, ctx) -> Shift | None:
        dims = _explicit_centering(ctx)
        s = ctx.shift(ctx.args[0])
        if dims is not None and s is not None and s.axes is not None and dims <= s.axes:
            return None  # h + c - mean(h + c) = h - mean(h) for c constant over the dims
        shifts = []
        for a in ctx.args[:2]:
            s = ctx.shift(a)
            shape = ctx.shape(a)
            if s is not None and shape is not None:
                s = map_shift(
                    s, lambda x, shape=shape: ax.map_right_aligned(x, len(shape), len(ctx.out_shape))
                )
            shifts.append(s)
        return merge_shifts(shifts)


class MulDiv(Rule):
    """mul/div by something constant along the centered axes keeps the fact (scalars, drop-path masks);
    a per-channel parameter right after a single writer is a LayerScale, folded into that writer."""

    def __init__(self, divide: bool = False) -> None:
        self.divide = divide

    def _operands(self, ctx):
        x = ctx.args[0]
        y = ctx.args[1] if len(ctx.args) > 1 else ctx.kwargs.get("other")
        return x, y

    def zero_mean(self, ctx) -> Fact:
        x, y = self._operands(ctx)
        order = [(x, y)] if self.divide else [(x, y), (y, x)]
        for a, b in order:
            fa, fb = ctx.fact(a), ctx.fact(b)
            if isinstance(fa, Centered | Free) and not isinstance(fb, Centered):
                a_axes = AddSub()._align(ctx, a)
                if not isinstance(a_axes, Centered | Free):
                    return a_axes if isinstance(a_axes, Broken) else Broken(f"{ctx.op} {ctx.where}")
                if fb == "scalar" or ctx.constant_along(b, a_axes):
                    return a_axes
                if isinstance(a_axes, Centered) and not self.divide:
                    scaled = ctx.layer_scale(a, b, a_axes)
                    if isinstance(scaled, Centered):
                        return scaled
                    if isinstance(scaled, str):
                        return Broken(scaled)
                return Broken(
                    f"{ctx.op} {ctx.where} scales the centered dim by a tensor that varies along it "
                    "(a per-channel scale not folded into a writer)"
                )
        for f in (ctx.fact(x), ctx.fact(y)):
            if isinstance(f, Broken):
                return f
        if self.divide:
            return Broken(
                f"{ctx.op} {ctx.where} divides by a tensor that is not constant along the centered dim"
            )
        return Broken(f"{ctx.op} {ctx.where} multiplies tensors that are not centered")

    def shift(self, ctx) -> Shift | None:
        x, y = self._operands(ctx)
        sx, sy = ctx.shift(x), ctx.shift(y)
        if sx is not None and sy is not None:
            ctx.escape(
                merge_shifts([sx, sy]), f"the centering shift reaches both factors of {ctx.op} {ctx.where}"
            )
            return None
        s, other, a = (sx, y, x) if sx is not None else (sy, x, y)
        if s is None:
            return None
        if self.divide and sy is not None:
            ctx.escape(sy, f"the centering shift reaches a divisor {ctx.where}")
            return None
        shape = ctx.shape(a)
        s = map_shift(s, lambda q: ax.map_right_aligned(q, len(shape), len(ctx.out_shape)))
        if ctx.fact(other) == "scalar" or ctx.is_planned_scale(other):
            return s
        if s.axes is not None and ctx.constant_along(other, s.axes):
            return s
        return Shift(None, s.writers)


class Neg(AxisMap):
    def __init__(self) -> None:
        super().__init__(_identity, "")


class Cat(Rule):
    """cat along a dim other than the centered axes of pieces all centered the same way."""

    def zero_mean(self, ctx) -> Fact:
        pieces = list(ctx.args[0])
        rank = len(ctx.out_shape)
        dim = ax.norm_dim(ctx.arg(1, 0), rank)
        facts = [ctx.fact(p) for p in pieces]
        merged = combine_sum(facts, ctx, ctx.op)
        # joined along the centered dim, zero-sum fibres make a zero-sum fibre; whether the centering shift stays
        # uniform there is the shift pass's question (it does for a self-cat, not for different writers)
        if isinstance(merged, Free):
            merged = Free(frozenset(o for o in merged.options if dim not in o[2])) or merged
        return merged

    def shift(self, ctx) -> Shift | None:
        rank = len(ctx.out_shape)
        dim = ax.norm_dim(ctx.arg(1, 0), rank)
        pieces = list(ctx.args[0])
        s = merge_shifts([ctx.shift(p) for p in pieces])
        self_cat = all(p is pieces[0] for p in pieces)  # the same shift in every piece: still uniform
        if s is not None and s.axes is not None and dim in s.axes and not self_cat:
            return Shift(None, s.writers)
        return s


class Stack(Rule):
    """stack inserts a new dim: axes at or after it move up by one."""

    def _mapper(self, ctx):
        dim = ax.norm_dim(ctx.arg(1, 0), len(ctx.out_shape))
        return lambda a: frozenset(x + 1 if x >= dim else x for x in a)

    def zero_mean(self, ctx) -> Fact:
        m = self._mapper(ctx)
        facts = [map_fact(ctx.fact(p), m, "") for p in ctx.args[0]]
        return combine_sum(facts, ctx, ctx.op)

    def shift(self, ctx) -> Shift | None:
        m = self._mapper(ctx)
        return merge_shifts([map_shift(ctx.shift(p), m) for p in ctx.args[0]])


class Split(Rule):
    """split/chunk/unbind along a dim other than the centered axes: every piece keeps the fact."""

    def __init__(self, removes_dim: bool = False) -> None:
        self.removes_dim = removes_dim

    def _mapper(self, ctx):
        rank = len(ctx.shape(ctx.args[0]))
        dim = ax.norm_dim(ctx.arg(1 if self.removes_dim else 2, 0, "dim"), rank)
        if self.removes_dim:
            return lambda a: ax.map_remove(a, [dim], rank)
        return lambda a: None if dim in a else a

    def zero_mean(self, ctx) -> Fact:
        f = map_fact(
            ctx.fact(ctx.args[0]), self._mapper(ctx), f"{ctx.op} {ctx.where} splits the centered dim"
        )
        return Multi(tuple(f for _ in range(ctx.num_outputs())))

    def shift(self, ctx) -> Multi | None:
        s = map_shift(ctx.shift(ctx.args[0]), self._mapper(ctx))
        return None if s is None else Multi(tuple(s for _ in range(ctx.num_outputs())))


class GetItem(Rule):
    def zero_mean(self, ctx) -> Fact | None:
        f = ctx.fact(ctx.args[0])
        return (
            f.items[ctx.args[1]]
            if isinstance(f, Multi) and ctx.args[1] < len(f.items)
            else Broken(f"output {ctx.args[1]} of {ctx.args[0]} {ctx.where}")
        )

    def shift(self, ctx) -> Shift | None:
        s = ctx.shift(ctx.args[0])
        if isinstance(s, Multi):
            return s.items[ctx.args[1]] if ctx.args[1] < len(s.items) else None
        return None


class WriterOp(Rule):
    """A linear map whose output dim can be centered by its parameters: a source of the zero-mean fact.

    weight_arg/bias_arg: argument positions; weight_dim: the weight dim that becomes the output's
    ``out_axis``; input_arg: the mapped input (a shift there escapes).
    """

    def __init__(self, kind, weight_arg, weight_dim, bias_arg, input_arg, out_axis) -> None:
        self.kind, self.weight_arg, self.weight_dim = kind, weight_arg, weight_dim
        self.bias_arg, self.input_arg, self.out_axis = bias_arg, input_arg, out_axis

    #: rank the weight must have for this op to be a writer
    weight_rank = 2

    def _out_axis(self, ctx) -> int:
        return ax.norm_dim(self.out_axis, len(ctx.out_shape))

    def _weight_dim(self, ctx) -> int:
        return self.weight_dim

    def blocked(self, ctx) -> str | None:
        shape = ctx.shape(ctx.arg(self.weight_arg))
        if shape is None or len(shape) != self.weight_rank:
            return f"{ctx.op} {ctx.where} has a weight of rank {len(shape or ())}, not a {self.weight_rank}-D writer"
        return None

    def zero_mean(self, ctx) -> Fact:
        why = self.blocked(ctx)
        if why:
            return Broken(why)
        weight = ctx.arg(self.weight_arg, None)
        bias = ctx.arg(self.bias_arg, None) if self.bias_arg is not None else None
        writers = []
        for t, dim in ((weight, self._weight_dim(ctx)), (bias, -1)):  # a bias's last dim is the output's
            if t is None:
                continue
            w = ctx.writer(t, dim, self.kind)
            if w is None:
                return Broken(f"{ctx.op} {ctx.where} uses a weight that is computed, not a parameter")
            writers.append(w)
        return Centered(frozenset({self._out_axis(ctx)}), frozenset(writers))

    def shift(self, ctx) -> Shift | None:
        x = ctx.arg(self.input_arg, None)
        sx = ctx.shift(x) if x is not None else None
        if sx is not None:
            ctx.escape(sx, f"the centering shift reaches the input of {ctx.op} {ctx.where}")
        weight_dim = ax.norm_dim(self._weight_dim(ctx), len(ctx.shape(ctx.arg(self.weight_arg))))
        blocked = bool(self.blocked(ctx))
        out = [
            _writer_shift(ctx, ctx.arg(arg, None), dim, self._out_axis(ctx), blocked)
            for arg, dim in ((self.weight_arg, weight_dim), (self.bias_arg, -1))
            if arg is not None
        ]
        return merge_shifts(out)


def _writer_shift(ctx, t: Any, dim: int, out_axis: int, blocked: bool = False) -> Shift | None:
    """A writer's parameter ``t`` carrying a centering shift over its writer ``dim``: that shift lands on the
    output's ``out_axis``; any other shift of the parameter (a use that centering changes) escapes."""
    s = ctx.shift(t) if t is not None else None
    if s is None:
        return None
    if s.axes != frozenset({ax.norm_dim(dim, len(ctx.shape(t) or (0,)))}) or blocked:
        ctx.escape(s, f"a centered parameter is also used by {ctx.op} {ctx.where}")
        return None
    return Shift(frozenset({out_axis}), s.writers)


class MatmulOp(WriterOp):
    """x @ W with a 2-D parameter W (in, out): centered over W's dim 1.  A shift of x uniform along axes other
    than the contracted one stays uniform along them (the rows of A in ``A @ B``, a factored weight)."""

    def __init__(self) -> None:
        super().__init__("matmul", 1, 1, None, 0, -1)

    def shift(self, ctx) -> Shift | None:
        x = ctx.arg(0)
        sx, rank = ctx.shift(x), len(ctx.shape(x) or ())
        if sx is None or sx.axes is None or rank < 2 or (rank - 1) in sx.axes or rank != len(ctx.out_shape):
            return super().shift(ctx)
        sw = ctx.shift(ctx.arg(1))
        if sw is not None:
            ctx.escape(
                merge_shifts([sx, sw]), f"the centering shift reaches both factors of {ctx.op} {ctx.where}"
            )
            return None
        return sx


class BilinearOp(WriterOp):
    """nn.Bilinear, ``x1^T W_o x2 + b_o``: W (out, in1, in2) centered over dim 0; a shift at either input escapes."""

    weight_rank = 3

    def __init__(self) -> None:
        super().__init__("linear", 2, 0, 3, 0, -1)

    def shift(self, ctx) -> Shift | None:
        s2 = ctx.shift(ctx.arg(1))
        if s2 is not None:
            ctx.escape(s2, f"the centering shift reaches the second input of {ctx.op} {ctx.where}")
        return super().shift(ctx)


def _einsum_linear(ctx) -> tuple[Any, Any, int, int] | None:
    """(input, W, W's output dim, output axis) when an einsum maps a tensor through a 2-D parameter W as a linear
    map: two operands, W's letters one contracted with the input and one that only W brings to the output
    ("btd,ed->bte", "...d,de->...e"); else None."""
    eq, ops = str(ctx.args[0]).replace(" ", ""), list(ctx.args[1])
    if len(ops) != 2 or "->" not in eq:
        return None
    lhs, out = eq.split("->")
    subs = lhs.split(",")
    letters = out.replace("...", "")
    if len(subs) != 2 or len(set(letters)) != len(letters) or "..." in out[1:]:
        return None
    for wi in (1, 0):
        w, sw, sx = ops[wi], subs[wi], subs[1 - wi]
        if len(sw) != 2 or len(ctx.shape(w) or ()) != 2:
            continue
        outs = [c for c in sw if c in letters and c not in sx]
        summed = [c for c in sw if c in sx and c not in letters]
        if len(outs) == 1 and len(summed) == 1:
            i = letters.index(outs[0])
            axis = len(ctx.out_shape) - len(letters) + i if out.startswith("...") else i
            return ops[1 - wi], w, sw.index(outs[0]), axis
    return None


class EinsumOp(Rule):
    """An einsum that is a linear map through a 2-D parameter (:func:`_einsum_linear`) is a writer."""

    def zero_mean(self, ctx) -> Fact:
        found = _einsum_linear(ctx)
        if found is None:
            return Broken(f"{ctx.op} {ctx.where} is not a linear map through one 2-D parameter")
        _, w, dim, axis = found
        writer = ctx.writer(w, dim, "matmul")
        if writer is None:
            return Broken(f"{ctx.op} {ctx.where} uses a weight that is computed, not a parameter")
        return Centered(frozenset({axis}), frozenset({writer}))

    def shift(self, ctx) -> Shift | None:
        found = _einsum_linear(ctx)
        if found is None:
            return Rule.shift(self, ctx)
        x, w, dim, axis = found
        sx = ctx.shift(x)
        if sx is not None:
            ctx.escape(sx, f"the centering shift reaches the input of {ctx.op} {ctx.where}")
        return _writer_shift(ctx, w, dim, axis)


class ConvOp(WriterOp):
    """A convolution with groups=1: output channels (dim 0 of the weight; dim 1 of a transposed convolution's
    (in, out, k...) weight) land on the channel axis, which is axis 1 of a batched input and axis 0 of an
    unbatched one."""

    def __init__(self, groups_arg: int, transposed_arg: int | None = None, transposed: bool = False) -> None:
        super().__init__("conv", 1, 0, 2, 0, 1)
        self.groups_arg, self.transposed_arg, self.transposed = groups_arg, transposed_arg, transposed

    def _is_transposed(self, ctx) -> bool:
        return self.transposed or (
            self.transposed_arg is not None and bool(ctx.arg(self.transposed_arg, False))
        )

    def _weight_dim(self, ctx) -> int:
        return 1 if self._is_transposed(ctx) else 0

    def _out_axis(self, ctx) -> int:
        spatial = len(ctx.shape(ctx.arg(self.weight_arg))) - 2
        return len(ctx.out_shape) - spatial - 1

    def blocked(self, ctx) -> str | None:
        shape = ctx.shape(ctx.arg(self.weight_arg))
        if shape is None or len(shape) < 3:
            return f"{ctx.op} {ctx.where} has no convolution weight"
        groups = ctx.arg(self.groups_arg, 1, "groups")
        if groups != 1:
            return (
                f"{ctx.op} {ctx.where} is a grouped convolution (groups={groups}): it mixes no channels across "
                "groups, so centering its weights does not center its output"
            )
        return None


class LayerNormOp(Rule):
    """A LayerNorm: its output is not centered (beta, gamma * x_hat); a shift uniform over its normalized
    dims is absorbed (LN(x + c) = LN(x))."""

    def __init__(self, multi: bool = False) -> None:
        self.multi = multi

    def normalized_axes(self, ctx) -> ax.Axes:
        rank = len(ctx.shape(ctx.args[0]))
        k = len(ctx.args[1])
        return frozenset(range(rank - k, rank))

    def zero_mean(self, ctx) -> Fact:
        f = Broken(f"the output of LayerNorm {ctx.where} is not centered (beta and gamma * x_hat)")
        return Multi((f, f, f)) if self.multi else f

    def shift(self, ctx) -> Shift | None:
        s = ctx.shift(ctx.args[0])
        if s is not None and s.axes != self.normalized_axes(ctx):
            ctx.escape(
                s, f"the centering shift reaches LayerNorm {ctx.where} without being uniform over its dims"
            )
        for a in ctx.args[2:4]:
            sa = ctx.shift(a) if _is_node(a) else None
            if sa is not None:
                ctx.escape(sa, f"a centered parameter is also the affine of LayerNorm {ctx.where}")
        if self.multi and s is not None:  # native_layer_norm: the mean output moves with the shift
            return Multi((None, s, None))
        return None


# ---------------------------------------------------------------------------------------------- the table

_VIEW = "mixes the centered dim with other dims"
ACTIVATION = "is a nonlinearity: it does not keep a zero mean"

RULES: dict[Any, Rule] = {}


def _register(ops, rule: Rule) -> None:
    for op in ops:
        RULES[op] = rule


_register(
    [
        aten.view.default,
        aten.reshape.default,
        aten._unsafe_view.default,
        aten.flatten.using_ints,
        aten.unflatten.int,
        aten.unsqueeze.default,
        aten.squeeze.default,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.view_as.default,
        aten.reshape_as.default,
    ],
    AxisMap(_reshape, _VIEW, zero_mean_mapper=_merging_reshape),
)
_register([aten.permute.default], AxisMap(_permute, _VIEW))
_register([aten.transpose.int, aten.swapaxes.default], AxisMap(_transpose, _VIEW))
_register([aten.t.default], AxisMap(_t, _VIEW))
_register([aten.numpy_T.default], AxisMap(_reverse, _VIEW))
_register([aten.movedim.int, aten.movedim.intlist], AxisMap(_movedim, _VIEW))
_register([aten.expand.default, aten.expand_as.default], AxisMap(_expand, "expands the centered dim"))
_register([aten.select.int], AxisMap(_select, "selects along the centered dim"))
_register([aten.slice.Tensor, aten.narrow.default], AxisMap(_slice, "slices the centered dim"))
_register([aten.index.Tensor], AxisMap(_index, "indexes the centered dim"))
_register([aten.constant_pad_nd.default, aten.pad.default], Pad())
_register([aten.roll.default], AxisMap(_roll, "rolls the flattened tensor"))
_register([aten.flip.default], AxisMap(_identity, ""))  # a permutation of each fibre, or of the fibres
_register([aten.repeat.default], AxisMap(_repeat, "repeats along the centered dim"))
_register([aten.cumsum.default], AxisMap(_along_other_dim(1), "sums cumulatively along the centered dim"))
_register([aten.index_select.default], AxisMap(_along_other_dim(1), "selects along the centered dim"))
_register(
    [aten.gather.default],
    AxisMap(_gather, "gathers along the centered dim, with a varying index, or part of each row"),
)
_register(
    [
        aten.upsample_nearest2d.vec,
        aten.upsample_bilinear2d.vec,
        aten.upsample_bicubic2d.vec,
        aten._upsample_bilinear2d_aa.vec,
        aten._upsample_bicubic2d_aa.vec,
        aten.upsample_nearest2d.default,
        aten.upsample_bilinear2d.default,
        aten.upsample_bicubic2d.default,
        aten.upsample_linear1d.vec,
        aten.upsample_nearest1d.vec,
    ],
    AxisMap(_spatial_resample, "interpolates along the centered dim"),
)
_register(
    [aten.mean.dim, aten.sum.dim_IntList],
    AxisMap(_reduce, "reduces over the centered dim"),
)
_register(
    [aten.adaptive_avg_pool1d.default, aten.avg_pool1d.default], AxisMap(_pool(1), "pools the centered dim")
)
_register(
    [aten.adaptive_avg_pool2d.default, aten.avg_pool2d.default, aten._adaptive_avg_pool2d.default],
    AxisMap(_pool(2), "pools the centered dim"),
)
_register(
    [aten.adaptive_avg_pool3d.default, aten.avg_pool3d.default, aten._adaptive_avg_pool3d.default],
    AxisMap(_pool(3), "pools the centered dim"),
)
_register(
    [
        aten.clone.default,
        aten.contiguous.default,
        aten.alias.default,
        aten.detach.default,
        aten.lift_fresh_copy.default,
        aten._to_copy.default,
        aten.to.dtype,
        aten.to.dtype_layout,
        aten.to.device,
        aten.to.other,
        aten.type_as.default,
        aten.positive.default,
        aten.neg.default,
    ],
    AxisMap(_identity, ""),
)
_register(
    [
        getattr(aten, name).default
        for name in (
            "new_empty",
            "new_zeros",
            "new_ones",
            "new_full",
            "empty_like",
            "zeros_like",
            "ones_like",
            "full_like",
            "rand_like",
            "randn_like",
        )
    ],
    Fresh(),
)
_register([aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default], Dropout())
_register([aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar], AddSub())
_register([aten.mul.Tensor, aten.mul.Scalar], MulDiv())
_register([aten.div.Tensor, aten.div.Scalar], MulDiv(divide=True))
_register([aten.cat.default, aten.concat.default], Cat())
_register([aten.stack.default], Stack())
_register([aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default], Split())
_register([aten.unbind.int], Split(removes_dim=True))
_register([operator.getitem], GetItem())
_register([aten.linear.default], WriterOp("linear", 1, 0, 2, 0, -1))
_register([aten.addmm.default], WriterOp("conv1d", 2, 1, 0, 1, -1))
_register([aten.mm.default, aten.matmul.default], MatmulOp())
_register([aten.bilinear.default], BilinearOp())
_register([aten.einsum.default], EinsumOp())
_register([aten.embedding.default], WriterOp("embedding", 0, 1, None, None, -1))
_register([aten.conv1d.default, aten.conv2d.default, aten.conv3d.default], ConvOp(groups_arg=6))
_register([aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding], ConvOp(groups_arg=6))
_register([aten.convolution.default], ConvOp(groups_arg=8, transposed_arg=6))
_register(
    [aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input],
    ConvOp(groups_arg=6, transposed=True),
)
_register([aten.layer_norm.default], LayerNormOp())
_register([aten.native_layer_norm.default], LayerNormOp(multi=True))
_register([aten._assert_tensor_metadata.default, aten.sym_size.int, aten._assert_scalar.default], Ignore())
for _op in (
    aten.gelu.default,
    aten.relu.default,
    aten.silu.default,
    aten.sigmoid.default,
    aten.tanh.default,
    aten.softmax.int,
    aten._softmax.default,
    aten.hardtanh.default,
    aten.leaky_relu.default,
    aten.elu.default,
    aten.mish.default,
    aten.hardswish.default,
    aten.pow.Tensor_Scalar,
    aten.exp.default,
    aten.abs.default,
):
    RULES[_op] = Breaks(ACTIVATION)


class AttentionOp(Rule):
    """``scaled_dot_product_attention(q, k, v)`` is ``A @ v`` with weights ``A`` that do not depend on ``v``: a
    value zero-mean over its last dim gives an output zero-mean over its last dim, and a shift of ``v`` uniform
    along its last dim stays so.  Over several heads the value must be zero-mean within each head, which
    centering a projection over all heads does not give (an output projection after the heads does).  A shift
    reaching q, k or the mask changes the weights."""

    def zero_mean(self, ctx) -> Fact:
        value = ctx.arg(2)
        fact, last = ctx.fact(value), len(ctx.shape(value) or ()) - 1
        if isinstance(fact, Centered) and _beyond_unit_dims(ctx, value, fact.axes) == {last}:
            return Centered(frozenset({len(ctx.out_shape) - 1}), fact.writers)
        if isinstance(fact, Broken):
            return fact
        return Broken(
            f"{ctx.op} {ctx.where} mixes tokens per head: its value is not zero-mean over its last dim "
            "within each head (an output projection after the heads would be)"
        )

    def shift(self, ctx) -> Shift | None:
        value = ctx.arg(2)
        for a in [*ctx.args[:2], *ctx.args[3:], *ctx.kwargs.values()]:  # q, k, the mask: every use but v's
            ctx.escape(
                ctx.shift(a), f"the centering shift reaches the attention weights of {ctx.op} {ctx.where}"
            )
        sv, last = ctx.shift(value), len(ctx.shape(value) or ()) - 1
        if sv is None:
            return None
        uniform = sv.axes is not None and last in sv.axes
        return Shift(frozenset({len(ctx.out_shape) - 1}) if uniform else None, sv.writers)


def _beyond_unit_dims(ctx, t: Any, axes: ax.Axes) -> ax.Axes:
    """``axes`` without the dims of size 1 (a mean over them is the same mean)."""
    shape = ctx.shape(t) or ()
    return frozenset(d for d in axes if d >= len(shape) or shape[d] != 1)


RULES[aten.scaled_dot_product_attention.default] = AttentionOp()
RULES[aten.rms_norm.default] = Breaks("is an RMSNorm: its output is not centered")
RULES[aten.group_norm.default] = Breaks("is a GroupNorm: its output is not centered")
RULES[aten.batch_norm.default] = Breaks("is a BatchNorm: its output is not centered")
RULES[aten.max_pool2d.default] = Breaks("is a max-pool: not mean-preserving")


class InPlace(Rule):
    """An in-place op (``add_``, ``mul_``, ...): its out-of-place twin's rule, when the tensor it overwrites is
    private to it.  Private: made by an op that returns a fresh tensor (not a view, not an input, parameter or
    buffer) and read by nothing else, so no other reader can see the value change."""

    def __init__(self, twin: Rule) -> None:
        self.twin = twin

    @staticmethod
    def overwrites_private(node) -> bool:
        target = node.args[0] if node.args else None
        while _is_node(target) and target.op == "call_function" and len(target.users) == 1:
            schema = getattr(target.target, "_schema", None)
            if schema is not None and all(r.alias_info is None for r in schema.returns):
                return True  # a fresh tensor
            if _out_of_place(target.target) is None:
                return False  # a view of something else
            target = target.args[0] if target.args else None  # an earlier in-place op: its own target
        return False

    def zero_mean(self, ctx) -> Fact:
        if self.overwrites_private(ctx.node):
            return self.twin.zero_mean(ctx)
        return Broken(f"{ctx.op} {ctx.where} overwrites in place a tensor that something else also reads")

    def shift(self, ctx) -> Shift | None:
        return self.twin.shift(ctx) if self.overwrites_private(ctx.node) else super().shift(ctx)


def _out_of_place(target: Any) -> Any:
    """The functional twin of an in-place ATen overload (``aten.add_.Tensor`` -> ``aten.add.Tensor``)."""
    schema = getattr(target, "_schema", None)
    name = schema.name.partition("::")[2] if schema is not None else ""
    if not name.endswith("_") or name.endswith("__") or not schema.is_mutable:
        return None
    packet = getattr(aten, name[:-1], None)
    return getattr(packet, target._overloadname, None) if packet is not None else None


def rule_for(target: Any) -> Rule:
    """The rule of an op; an in-place op gets its twin's (guarded by ``InPlace``); unknown ops get the default
    rule (break the fact, stop the shift)."""
    rule = RULES.get(target)
    if rule is None:
        twin = RULES.get(_out_of_place(target))
        rule = InPlace(twin) if twin is not None else _DEFAULT
    return rule


_DEFAULT = Rule()
