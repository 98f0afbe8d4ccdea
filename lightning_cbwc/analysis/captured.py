"""Capture a model's ATen graph with torch.export, and name what its placeholders are."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..errors import CaptureError, first_line
from ..verify import eval_mode, train_mode


@dataclass
class Captured:
    """An exported graph with the facts the analysis needs about its placeholders and modules."""

    model: nn.Module
    program: torch.export.ExportedProgram
    #: placeholder name -> ("parameter" | "buffer" | "constant" | "input", qualified name)
    placeholders: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def graph(self) -> fx.Graph:
        return self.program.graph


def _hint(model: nn.Module, kwargs: dict[str, Any]) -> str:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False) and kwargs.get("use_cache") is not False:
        return (
            "this looks like a Hugging Face model with use_cache=True: pass example_kwargs={'use_cache': False} "
            "or set model.config.use_cache = False before analyzing"
        )
    return (
        "make the forward traceable by torch.export (no data-dependent Python control flow on tensor values, "
        "no .item()/.tolist() in forward), or analyze a submodule that is"
    )


def trains_with_own_flags(model: nn.Module) -> bool:
    """Whether the train-mode capture keeps the modules' own train/eval flags (some module is in train mode:
    Lightning trains with them as they are) rather than ``model.train()``'s."""
    return any(m.training for m in model.modules())


def capture(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None, *, training: bool = False
) -> Captured:
    """Export ``model`` in eval mode (strict=False, then strict) and return the graph with placeholder roles.

    ``training=True`` captures the graph the model trains with instead: its modules' own flags when any
    of them is in train mode (Lightning trains with them as they are), else ``model.train()``'s.
    """
    kwargs = dict(kwargs or {})
    if not isinstance(args, tuple):
        args = (args,)
    errors: list[str] = []
    program = None
    if training:
        mode = contextlib.nullcontext() if trains_with_own_flags(model) else train_mode(model)
    else:
        mode = eval_mode(model)
    with mode:
        for strict in (False, True):
            try:
                with torch.no_grad():
                    program = torch.export.export(model, args, kwargs, strict=strict)
                break
            except Exception as exc:  # torch.export raises many types; report them all
                errors.append(f"strict={strict}: {type(exc).__name__}: {first_line(exc)}")
    if program is None:
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {errors[0]}. Fix: {_hint(model, kwargs)}."
        )
    sig = program.graph_signature
    roles: dict[str, tuple[str, str]] = {}
    for name, fqn in sig.inputs_to_parameters.items():
        roles[name] = ("parameter", fqn)
    for name, fqn in sig.inputs_to_buffers.items():
        roles[name] = ("buffer", fqn)
    for name, fqn in sig.inputs_to_lifted_tensor_constants.items():
        roles[name] = ("constant", fqn)
    for name in sig.user_inputs:
        roles[name] = ("input", name)
    return Captured(model=model, program=program, placeholders=roles)


def _size(s: Any) -> int:
    """A dim's size; -1 for a data-dependent one (``x[mask]``, ``nonzero``): no rule takes -1 for 1."""
    try:
        return int(s)
    except Exception:  # torch raises GuardOnDataDependentSymNode (and kin) for unbacked sizes
        return -1


def tensor_shape(node: Any) -> tuple[int, ...] | None:
    """The shape of a graph node's example value (None for non-tensors)."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(_size(s) for s in val.shape)
    return None


def nested_calls(cap: Captured, targets: tuple) -> list[tuple[fx.Node, str, fx.Node]]:
    """(node, region, outer) for each call of ``targets`` inside the subgraphs of higher-order ops (cond
    branches, autocast / grad-mode regions...): ``region`` names the ops running the subgraph, ``outer`` is
    the top-level node that runs it (its inputs are the subgraph's operands)."""
    root = cap.program.graph_module
    out: list[tuple[fx.Node, str, fx.Node]] = []

    def walk(graph: fx.Graph, region: str, outer: fx.Node | None) -> None:
        for n in graph.nodes:
            sub = getattr(root, n.target, None) if n.op == "get_attr" else None
            if isinstance(sub, fx.GraphModule):
                for u in n.users:
                    name = str(getattr(u.target, "__name__", u.target)).rsplit(".", 1)[-1]
                    walk(sub.graph, name, outer or u)
            elif outer is not None and n.op == "call_function" and n.target in targets:
                out.append((n, region, outer))

    walk(cap.graph, "", None)
    return out


def module_path(node: fx.Node) -> tuple[str, str]:
    """(qualified name, type name) of the innermost module that ran ``node``; ("", "") at top level."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, typ = list(stack.values())[-1]
    typ = typ if isinstance(typ, str) else getattr(typ, "__qualname__", str(typ))
    return path, typ.rsplit(".", 1)[-1]
