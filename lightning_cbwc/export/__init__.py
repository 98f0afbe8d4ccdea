"""Export a folded model: safetensors (weights, rebuilt by :func:`load_folded`), torch.export (.pt2) or ONNX.

    result = export(folded, "out/vit", "onnx", (x,))     # out/vit/model.onnx, checked with onnxruntime
    model = load_folded("out/vit")                        # safetensors: rebuild the architecture, swap, load

Every export runs the artefact it wrote against the PyTorch model on fresh random inputs (another batch size
and, for token inputs, another sequence length than the example, when those dims are dynamic), records the max
error relative to the output RMS in the result and in the ``exports`` section of ``cbwc.json`` beside it, and
raises :class:`ExportError` beyond the tolerance.  ``cbwc.json`` also holds the fold ``plan`` and, for
safetensors, the ``architecture`` (:mod:`.sidecar`).

Modules, imports flowing down: :mod:`.portable` (norms as stock aten ops while exporting), :mod:`.shapes`
(named inputs, dynamic dims, fresh inputs), :mod:`.architecture`, :mod:`.sidecar`, :mod:`.load`
(:func:`load_folded`), :mod:`.formats` (safetensors, pt2 and the one safetensors writer), :mod:`.onnx`, this
module (:func:`export`), and :mod:`.trained` (the callback's export at fit end).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..analysis import FoldPlan
from ..errors import ExportError
from ..inputs import split_inputs
from ..norm import RMSNorm
from ..training.state import converted_state
from ..verify import max_relative_error, output_tensors, tolerance
from .architecture import build_architecture, describe_architecture
from .converted import inference_copy
from .formats import FORMATS, Written, artefact_path, save_safetensors, write_pt2, write_safetensors
from .load import apply_structure, load_folded, read_plan
from .onnx import DEFAULT_OPSET, ONNX_NORM_OPS, write_onnx
from .portable import portable_norms
from .shapes import axis_names, dynamic_shapes_for, fresh_inputs, input_shapes, named_tensors, traceable_batch
from .sidecar import SIDECAR, read_sidecar, sidecar_path, update_sidecar

__all__ = [
    "DEFAULT_OPSET",
    "FORMATS",
    "ONNX_NORM_OPS",
    "SIDECAR",
    "ExportError",
    "ExportResult",
    "apply_structure",
    "build_architecture",
    "describe_architecture",
    "dynamic_shapes_for",
    "export",
    "fresh_inputs",
    "load_folded",
    "portable_norms",
    "read_plan",
    "read_sidecar",
    "save_safetensors",
    "update_sidecar",
]

log = logging.getLogger("lightning_cbwc")

#: the modules whose versions an export record names, by format (imported by then: the writer used them)
_FORMAT_MODULES = {"onnx": ("onnx", "onnxruntime", "onnxscript"), "safetensors": ("safetensors",)}


def _versions(fmt: str) -> dict[str, str]:
    out = {"torch": torch.__version__}
    try:
        out["lightning_cbwc"] = version("lightning-cbwc")
    except PackageNotFoundError:  # run from a source tree that was never installed
        out["lightning_cbwc"] = "not installed"
    for mod in _FORMAT_MODULES.get(fmt, ()):
        if mod in sys.modules:
            out[mod] = str(getattr(sys.modules[mod], "__version__", "unknown"))
    return out


@dataclass
class ExportResult:
    """What an export wrote and how closely the artefact reproduces the PyTorch model.

    ``max_error`` is max |artefact - model| / RMS(model output) on ``check_shapes`` (fresh random inputs);
    ``dynamic_dims`` maps each input to the dims the artefact leaves free (``{"input_ids": {0: "batch", 1:
    "seq"}}``); ``norm_ops`` counts the normalization ops of an ONNX graph; ``files`` lists every file
    written, ``cbwc.json`` last.
    """

    format: str
    path: Path
    files: list[Path]
    max_error: float
    tolerance: float
    check_shapes: dict[str, list[int]] = field(default_factory=dict)
    example_shapes: dict[str, list[int]] = field(default_factory=dict)
    dynamic_dims: dict[str, dict[int, str]] = field(default_factory=dict)
    checked_with: str = ""
    opset: int | None = None
    norm_ops: dict[str, int] = field(default_factory=dict)
    fused: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: modules to import before loading (pt2: the pytree types of the inputs and outputs)
    imports: list[str] = field(default_factory=list)
    plan: FoldPlan | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.max_error <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        """The check record, as stored in ``cbwc.json`` under ``exports.<format>``."""
        return {
            "format": self.format,
            "path": str(self.path),
            "files": [str(f) for f in self.files],
            "ok": self.ok,
            "max_error": self.max_error,
            "max_error_definition": "max |artefact - pytorch| / RMS(pytorch output) on fresh random inputs",
            "tolerance": self.tolerance,
            "checked_with": self.checked_with,
            "check_shapes": self.check_shapes,
            "example_shapes": self.example_shapes,
            "dynamic_dims": {k: {str(d): n for d, n in v.items()} for k, v in self.dynamic_dims.items()},
            "opset": self.opset,
            "norm_ops": self.norm_ops,
            "fused_affine": self.fused,
            "plan_summary": self.plan.summary() if self.plan is not None else None,
            "notes": self.notes,
            "imports": self.imports,
            "versions": _versions(self.format),
        }


def _compare(ref: Any, got: list[torch.Tensor], what: str) -> float:
    refs = output_tensors(ref)
    gots = [g for g in got if g.is_floating_point()]
    if len(refs) != len(gots):
        raise ExportError(
            f"the {what} returns {len(gots)} floating-point outputs and the PyTorch model {len(refs)}: "
            "cannot compare them"
        )
    for r, g in zip(refs, gots, strict=True):
        if tuple(r.shape) != tuple(g.shape):
            raise ExportError(
                f"the {what} returns shape {tuple(g.shape)} where the PyTorch model returns {tuple(r.shape)}"
            )
    return max_relative_error(refs, gots)


def _format(format: str, opset: int, onnx_norm_op: str) -> str:
    """The normalized format name, after checking the options that go with it."""
    fmt = format.lower().removeprefix(".")
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")
    if fmt == "onnx" and onnx_norm_op not in ONNX_NORM_OPS:
        raise ExportError(f"onnx_norm_op must be one of {ONNX_NORM_OPS}, not {onnx_norm_op!r}")
    if fmt == "onnx" and opset < 23 and onnx_norm_op == "RMSNormalization":
        log.warning("opset %d < 23 has no RMSNormalization: the RMSNorms export as elementwise ops", opset)
    return fmt


def _result(
    fmt: str,
    file: Path,
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    w: Written,
    plan: FoldPlan | None,
    fused: list[str],
    tol: Any,
) -> ExportResult:
    names = axis_names(w.free, named_tensors(model, args, kwargs))
    what = {"safetensors": "reloaded model", "pt2": "reloaded program", "onnx": "ONNX model"}[fmt]
    return ExportResult(
        format=fmt,
        path=file,
        files=[*w.files, sidecar_path(file.parent)],
        max_error=_compare(w.ref, w.got, what),
        tolerance=tol if tol is not None else tolerance(w.ref),
        check_shapes=input_shapes(model, w.check_args, w.check_kwargs),
        example_shapes=input_shapes(model, args, kwargs),
        dynamic_dims={
            n: {d: names.get(sym, str(sym)) for d, sym in dims.items()} for n, dims in w.free.items()
        },
        checked_with=w.checked_with,
        opset=w.opset,
        norm_ops=w.norm_ops,
        fused=fused,
        notes=w.notes,
        imports=w.imports,
        plan=plan,
    )


def _write_program(
    fmt: str,
    model: nn.Module,
    file: Path,
    args: tuple,
    kwargs: dict,
    dynamic: bool,
    opset: int,
    onnx_norm_op: str,
    seed: int,
) -> tuple[Any, tuple, dict]:
    """The pt2 or ONNX artefact and the example it was traced with: torch.export pins a dim of size 1, so a
    batch-1 example is traced at batch 2 (:func:`.shapes.traceable_batch`), or as given when the model cannot
    run at batch 2."""

    def write(a: tuple, k: dict) -> Any:
        if fmt == "pt2":
            return write_pt2(model, file, a, k, dynamic, seed)
        return write_onnx(model, file, a, k, dynamic, opset, onnx_norm_op, seed)

    tiled = traceable_batch(args, kwargs) if dynamic else None
    if tiled is not None:
        try:
            return write(*tiled), *tiled
        except ExportError:
            pass  # a model that only runs at batch 1
    return write(args, kwargs), args, kwargs


def export(
    model: nn.Module,
    path: str | Path,
    format: str,
    example_inputs: Any = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    plan: FoldPlan | None = None,
    dynamic: bool = True,
    fold_first: bool = False,
    fuse_affine: bool = False,
    architecture: Any = None,
    opset: int = DEFAULT_OPSET,
    onnx_norm_op: str = "RMSNormalization",
    tol: float | None = None,
    seed: int = 1234,
) -> ExportResult:
    """Write ``model`` (folded, or folded here with ``fold_first``) as ``format`` to ``path`` and check it.

    ``path``: a folder (the artefact is ``model.<ext>``) or a file with the format's suffix; ``cbwc.json``
    beside it gets the ``plan``, (for safetensors) the ``architecture`` and, under ``exports.<format>``, the
    check record.  ``example_inputs``: anything :func:`lightning_cbwc.inputs.split_inputs` takes (a tensor, a
    tuple of positional arguments, a dict of keyword arguments, an ``(args, kwargs)`` pair).
    ``format``: ``safetensors`` (weights; :func:`load_folded` rebuilds the model), ``pt2`` (torch.export
    program, dynamic batch/sequence dims when ``dynamic``) or ``onnx`` (dynamo exporter, ``opset`` >= 23 for
    ``RMSNormalization``).  The artefact is run against ``model`` on fresh random inputs (other batch and
    sequence sizes where the dims are dynamic); beyond ``tol`` (default: by dtype, 1e-4 for float32) it
    raises :class:`ExportError`.  ``architecture`` (safetensors): a dict or spec string for
    :func:`describe_architecture`, or a no-argument factory used for the round trip (not saved).
    ``fuse_affine`` is passed to ``fold`` with ``fold_first``: it moves each norm's beta into the linears it
    feeds, which an ONNX runtime needs to gain from RMSNormalization (see :mod:`.onnx`).  A model converted
    for training (:func:`lightning_cbwc.convert`, the callback) is written in its inference form
    (:func:`.converted.inference_copy`) with its own plan; the model itself is left as it is."""
    fmt = _format(format, opset, onnx_norm_op)
    args, kwargs = split_inputs(example_inputs, example_kwargs)
    state = converted_state(model)
    if state is not None and (
        state.norms or state.inference_only
    ):  # trained with CBWC: export its inference form, with its own plan
        model = inference_copy(model, (args, kwargs))
        plan = plan if plan is not None else converted_state(model).plan
    elif fold_first:
        from ..folding import fold

        model = fold(model, args, kwargs or None, fuse_affine=fuse_affine)
    plan = plan if plan is not None else getattr(model, "cbwc_plan", None)
    if fmt == "safetensors" and plan is None and any(isinstance(m, RMSNorm) for m in model.modules()):
        raise ExportError(
            "the model has RMSNorm modules but no fold plan: pass plan= (or export(..., fold_first=True)); "
            f"load_folded needs the plan in {SIDECAR} to rebuild it"
        )

    file = artefact_path(path, fmt)
    file.parent.mkdir(parents=True, exist_ok=True)
    if plan is not None:
        update_sidecar(file.parent, plan=plan.to_dict())
    fused = list(getattr(model, "cbwc_fused", []) or [])  # set by fold(); a model not folded here has none
    if fmt == "safetensors":
        w = write_safetensors(model, file, args, kwargs, fused, architecture, seed)
    else:
        w, args, kwargs = _write_program(fmt, model, file, args, kwargs, dynamic, opset, onnx_norm_op, seed)

    result = _result(fmt, file, model, args, kwargs, w, plan, fused, tol)
    if dynamic and fmt != "safetensors" and not w.free:
        result.notes.append("no input dim stayed dynamic: the model pins every dim it was exported with")
    update_sidecar(file.parent, exports={fmt: result.to_dict()})
    if not result.ok:
        raise ExportError(
            f"the exported {fmt} artefact {str(file)!r} differs from the PyTorch model by {result.max_error:.3g} "
            f"(max |diff| / RMS(output) on fresh inputs {result.check_shapes}; tolerance {result.tolerance:.3g}); "
            f"the artefact and its record in {SIDECAR} (exports.{fmt}) are left for inspection",
            max_error=result.max_error,
            tolerance=result.tolerance,
        )
    return result
