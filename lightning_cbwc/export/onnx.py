"""The ONNX writer: the dynamo exporter at opset >= 23, where RMSNorm becomes the standard RMSNormalization.

RMSNormalization is the default because it is standard ONNX and ONNX Runtime runs it with the same kernel as
its contrib ``SimplifiedLayerNormalization`` (``onnx_norm_op="SimplifiedLayerNormalization"`` renames the
nodes, for comparison).  An RMSNorm that keeps its beta exports as RMSNormalization + Add, and that Add costs
about what the norm saves: fold with ``fuse_affine=True`` so beta lands in the bias of the linears the norm
feeds.  The measurements are in BENCHMARKS.md (ONNX Runtime).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ExportError, first_line
from ..norm import RMSNorm
from ..verify import eval_mode, run
from .formats import Written
from .portable import portable_norms
from .shapes import axis_names, dynamic_shapes_for, free_dims, fresh_inputs, named_tensors, symbol_sizes

ONNX_NORM_OPS = ("RMSNormalization", "SimplifiedLayerNormalization")
#: opset of ONNX exports: RMSNormalization is in the default domain from opset 23
DEFAULT_OPSET = 23
_NORM_OP_TYPES = {
    "LayerNormalization",
    "RMSNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
}


def onnx_norm_counts(proto: Any) -> dict[str, int]:
    """How many nodes of each normalization op the graph (and its local functions) holds."""
    nodes = [*proto.graph.node, *(n for fn in proto.functions for n in fn.node)]
    counts: dict[str, int] = {}
    for n in nodes:
        if n.op_type in _NORM_OP_TYPES:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def to_simplified_layer_norm(proto: Any) -> int:
    """Rename every RMSNormalization node to ORT's SimplifiedLayerNormalization (same inputs/attributes)."""
    n_renamed = 0
    for n in proto.graph.node:
        if n.op_type == "RMSNormalization" and n.domain in ("", "ai.onnx"):
            n.op_type = "SimplifiedLayerNormalization"
            n_renamed += 1
    return n_renamed


def run_onnx(file: Path, model: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The outputs of onnxruntime (CPU) on (args, kwargs), matched to the graph's inputs by name or order."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(file), so, providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    named = named_tensors(model, args, kwargs)
    by_name = dict(named)
    if all(i.name in by_name for i in inputs):
        feed = {i.name: by_name[i.name] for i in inputs}
    elif len(inputs) == len(named):
        feed = {i.name: t for i, (_, t) in zip(inputs, named, strict=True)}
    else:
        raise ExportError(
            f"the ONNX model takes inputs {[i.name for i in inputs]} and the example has {[n for n, _ in named]}"
        )
    outs = session.run(None, {k: v.detach().cpu().numpy() for k, v in feed.items()})
    return [torch.from_numpy(np.asarray(o)) for o in outs]


def _onnx_program(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool, opset: int) -> Any:
    with portable_norms(model), eval_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.onnx.export(
                model,
                tuple(args),
                kwargs=dict(kwargs) or None,
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=dynamic_shapes_for(model, args, kwargs, dynamic),
                verbose=False,
                optimize=True,
            )
        except Exception as e:
            raise ExportError(
                f"torch.onnx.export (dynamo) failed for {type(model).__name__}: {first_line(e)}"
            ) from e


def _save(program: Any, file: Path, norm_op: str) -> list[Path]:
    import onnx

    if norm_op == "SimplifiedLayerNormalization":
        proto = program.model_proto
        to_simplified_layer_norm(proto)
        onnx.save_model(proto, str(file), save_as_external_data=proto.ByteSize() > 1_800_000_000)
    else:
        program.save(str(file))
    return [file, *[p for p in [file.parent / (file.name + ".data")] if p.exists()]]


def write_onnx(
    model: nn.Module,
    file: Path,
    args: tuple,
    kwargs: dict,
    dynamic: bool,
    opset: int,
    norm_op: str,
    seed: int,
) -> Written:
    """An ONNX model to ``file`` (free dims named ``batch``, ``seq``...), run with onnxruntime on fresh inputs."""
    import onnx

    named = named_tensors(model, args, kwargs)
    program = _onnx_program(model, args, kwargs, dynamic, opset)
    ep = program.exported_program
    free = free_dims(ep, named) if ep is not None else {}
    names = axis_names(free, named)
    if names:
        program.rename_axes({str(sym): name for sym, name in names.items()})
    files = _save(program, file, norm_op)

    proto = onnx.load(str(file), load_external_data=False)
    norm_ops = onnx_norm_counts(proto)
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    sizes = symbol_sizes(ep, free, named) if ep is not None else {}
    check_args, check_kwargs = fresh_inputs(model, args, kwargs, free, sizes, seed)
    try:
        ref = run(model, check_args, check_kwargs)
    except Exception as e:  # the exporter left free a dim the model pins (a batch-1-only forward)
        shapes = {n: tuple(t.shape) for n, t in named_tensors(model, check_args, check_kwargs)}
        raise ExportError(
            f"{type(model).__name__} does not run on the check's fresh inputs {shapes}, which the ONNX graph "
            f"accepts ({first_line(e)}): export with dynamic=False, or with an example of the batch it runs at"
        ) from e
    try:
        got = run_onnx(file, model, check_args, check_kwargs)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"onnxruntime cannot run {str(file)!r}: {first_line(e)}") from e
    notes = []
    n_rms = sum(1 for m in model.modules() if isinstance(m, RMSNorm))
    if norm_ops.get(norm_op, 0) < n_rms and (opset_used >= 23 or norm_op != "RMSNormalization"):
        notes.append(f"{n_rms} RMSNorm modules but {norm_ops.get(norm_op, 0)} {norm_op} nodes in the graph")
    checked_with = "onnxruntime CPUExecutionProvider"
    return Written(files, ref, got, check_args, check_kwargs, checked_with, free, opset_used, norm_ops, notes)
