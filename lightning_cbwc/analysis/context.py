"""What a rule of the op table may ask about one node of the captured graph, in either pass."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from . import axes as ax
from .captured import module_path, tensor_shape
from .facts import Centered, Fact, Free, Multi, Shift
from .plan import Writer
from .rules import WriterOp, rule_for

aten = torch.ops.aten


def _op_name(target: Any) -> str:
    name = str(target)
    if name.startswith("<built-in function "):
        return name[len("<built-in function ") : -1]
    return name.removesuffix(".default")


class Context:
    """What a rule may ask about one node, in either pass."""

    def __init__(self, analysis: Any, node: fx.Node, shifts: dict | None = None) -> None:
        self.a, self.node, self.shifts = analysis, node, shifts
        self.args, self.kwargs = node.args, node.kwargs
        self.out_shape = tensor_shape(node) or ()
        path, typ = module_path(node)
        self.module = path
        self.where = f"in {path} ({typ})" if path else "at the top level"
        self.op = _op_name(node.target)

    # --- arguments
    def arg(self, i: int, default: Any = None, name: str | None = None) -> Any:
        if i is not None and i < len(self.args):
            return self.args[i]
        if name is not None and name in self.kwargs:
            return self.kwargs[name]
        return default

    def shape(self, a: Any) -> tuple[int, ...] | None:
        return tensor_shape(a)

    def num_outputs(self) -> int:
        val = self.node.meta.get("val")
        return len(val) if isinstance(val, list | tuple) else 1

    def fact(self, a: Any) -> Fact | str | None:
        if isinstance(a, fx.Node):
            return self.a.facts.get(a)
        if isinstance(a, int | float | bool):
            return "scalar"
        return None

    def is_zero_scalar(self, a: Any) -> bool:
        return isinstance(a, int | float) and a == 0

    def constant_along(self, b: Any, fact_or_axes: Any) -> bool:
        axes = fact_or_axes.axes if isinstance(fact_or_axes, Centered) else None
        if isinstance(fact_or_axes, Free):
            return False
        if isinstance(fact_or_axes, frozenset):
            axes = fact_or_axes
        shape = self.shape(b)
        if shape is None:
            return not isinstance(b, fx.Node)
        return axes is not None and ax.constant_along(axes, shape, len(self.out_shape))

    # --- writers
    def writer(self, t: Any, dim: int, kind: str) -> Writer | None:
        """The Writer centering placeholder ``t`` over ``dim``; a transposed 2-D parameter (peft's
        ``x @ lora_embedding_B.T``) is centered over the other dim of the parameter itself."""
        if isinstance(t, fx.Node) and t.target in (aten.t.default, aten.transpose.int, aten.numpy_T.default):
            src = t.args[0]
            if len(tensor_shape(src) or ()) == 2 and len(t.users) == 1:
                return self.writer(src, 1 - ax.norm_dim(dim, 2), kind)
            return None
        if (
            isinstance(t, fx.Node)
            and t.target in (aten.mm.default, aten.matmul.default)
            and len(t.users) == 1
        ):
            a, b = t.args[:2]  # a factored weight A @ B: center A over its rows, or B over its columns
            if len(tensor_shape(a) or ()) == 2 and len(tensor_shape(b) or ()) == 2:
                return self.writer(a, 0, kind) if ax.norm_dim(dim, 2) == 0 else self.writer(b, 1, kind)
            return None
        if not isinstance(t, fx.Node) or t.op != "placeholder":
            return None
        role = self.a.cap.placeholders.get(t.name, ("", ""))[0]
        if role not in ("parameter", "buffer"):
            return None
        rank = len(tensor_shape(t) or ())
        return Writer(self.a.param_name(t, self.module), ax.norm_dim(dim, rank), kind, self.module)

    def param_writer(self, placeholder: str, dim: int) -> Writer:
        node = self.a.by_name[placeholder]
        return Writer(self.a.param_name(node, ""), dim, "parameter", self.module)

    def layer_scale(self, a: fx.Node, b: Any, centered: Centered) -> Centered | str | None:
        """A per-channel parameter right after a single writer: fold it into the writer (LayerScale)."""
        shape = tensor_shape(b)
        while isinstance(b, fx.Node) and b.op == "call_function" and len(b.users) == 1 and b.args:
            if b.target not in (aten.view.default, aten.reshape.default, aten.unsqueeze.default):
                return None
            b = b.args[0]
        if not (isinstance(b, fx.Node) and b.op == "placeholder") or shape is None:
            return None
        if self.a.cap.placeholders.get(b.name, ("",))[0] != "parameter" or len(centered.axes) != 1:
            return None
        (axis,) = centered.axes
        varying = [i for i, s in enumerate(shape) if s != 1]
        if [i + len(self.out_shape) - len(shape) for i in varying] != [axis]:
            return None
        node = a
        while not isinstance(rule_for(node.target), WriterOp):
            if len(node.users) != 1 or node.op != "call_function" or not node.args:
                return f"the per-channel scale {self.where} does not follow a single writer directly"
            node = node.args[0]
        if len(node.users) != 1 or any(w.scale for w in centered.writers):
            return f"the per-channel scale {self.where} does not follow a single writer directly"
        roles = self.a.cap.placeholders
        params = [
            p
            for p in node.all_input_nodes
            if p.op == "placeholder" and roles.get(p.name, ("",))[0] in ("parameter", "buffer")
        ]
        if any(len(p.users) != 1 for p in params):
            return f"the per-channel scale {self.where} follows a writer whose parameters are shared"
        if {w.param for w in centered.writers} != {
            self.a.param_name(p, module_path(node)[0]) for p in params
        }:
            return f"the per-channel scale {self.where} does not follow a single writer directly"
        scale = self.a.param_name(b, self.module)
        # one LayerScale may scale several writers: it folds only if every one of its uses is such a writer's
        self.a.scale_uses.setdefault(scale, {})[self.node] = frozenset(w.param for w in centered.writers)
        return Centered(
            centered.axes,
            frozenset(Writer(w.param, w.dim, w.kind, w.module, scale) for w in centered.writers),
        )

    def is_planned_scale(self, b: Any) -> bool:
        return (
            isinstance(b, fx.Node)
            and b.op == "placeholder"
            and self.a.param_name(b, self.module) in self.a.scales
        )

    # --- shift pass
    def shift(self, a: Any) -> Shift | None:
        if not isinstance(a, fx.Node) or self.shifts is None:
            return None
        return self.shifts.get(a)

    def input_shifts(self) -> list[Shift | None]:
        out = []
        for n in self.node.all_input_nodes:
            s = self.shift(n)
            if isinstance(s, Multi):
                out.extend(s.items)
            else:
                out.append(s)
        return out

    def escape(self, shift: Shift | None, reason: str) -> None:
        if shift is not None:
            for w in shift.writers:
                self.a.unsafe.setdefault(w, reason)
