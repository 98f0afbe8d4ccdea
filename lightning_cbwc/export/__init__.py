"""Export a folded model: safetensors (+ plan.json, architecture.json), torch.export (.pt2) or ONNX.

    result = export(folded, "out/vit", "onnx", (x,))     # out/vit/model.onnx, checked with onnxruntime
    model = load_folded("out/vit")                        # safetensors: rebuild the architecture, swap, load

Every export runs the artefact it wrote against the PyTorch model on fresh random inputs (another batch size
and, for token inputs, another sequence length than the example, when those dims are dynamic), records the max
error relative to the output RMS in the result and in ``<artefact>.json`` beside it, and raises
:class:`ExportError` beyond the tolerance.

RMSNorm modules call the package's fused C++ kernel (the ``lightning_cbwc::rms_norm`` custom op), which neither
``torch.export.load`` without this package nor ONNX knows.  While exporting to pt2 / ONNX they compute with
stock ``F.rms_norm`` plus the bias instead (:func:`portable_norms`): the pt2 program is plain aten, and the ONNX
exporter (opset >= 23) turns ``aten.rms_norm`` into the standard ``RMSNormalization`` op.

Which ONNX op: measured with onnxruntime 1.32 on this machine's CPU (``benchmarks/bench_ort.py --ops
--threads 1 --rounds 200``, fp32, median): 1576x192: LayerNormalization 232 us, RMSNormalization 139 us, ORT's
contrib SimplifiedLayerNormalization 138 us; 1576x384: 466 / 353 / 323 us.  RMSNormalization is as fast as
the contrib op (ORT runs the same kernel) and is standard ONNX, so it is the default;
``onnx_norm_op="SimplifiedLayerNormalization"`` is there for comparison.  An RMSNorm that keeps its beta
exports as RMSNormalization + Add, and that Add costs about what the norm saves (1576x192: 248 us): fold with
``fuse_affine=True`` so beta lands in the bias of the linears the norm feeds.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import logging
import math
import types
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from ..analysis import FoldPlan, NormSite, Writer
from ..centering import CenteredEmbedding
from ..errors import CBWCError, CheckpointError, ExportError
from ..norm import RMSNorm, RMSNorm2d
from ..verify import max_relative_error, output_tensors, run, tolerance

log = logging.getLogger("lightning_cbwc")

FORMATS = ("safetensors", "pt2", "onnx")
_SUFFIX = {"safetensors": ".safetensors", "pt2": ".pt2", "onnx": ".onnx"}
ONNX_NORM_OPS = ("RMSNormalization", "SimplifiedLayerNormalization")
#: opset of ONNX exports: RMSNormalization is in the default domain from opset 23
DEFAULT_OPSET = 23

PLAN_FILE = "plan.json"
ARCHITECTURE_FILE = "architecture.json"


@dataclass
class ExportResult:
    """What an export wrote and how closely the artefact reproduces the PyTorch model.

    ``max_error`` is max |artefact - model| / RMS(model output) on ``check_shapes`` (fresh random inputs);
    ``dynamic_dims`` maps each input to the dims the artefact leaves free (``{"input_ids": {0: "batch", 1:
    "seq"}}``); ``norm_ops`` counts the normalization ops of an ONNX graph.
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
    plan: FoldPlan | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.max_error <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
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
            "versions": _versions(self.format),
        }


# ----------------------------------------------------------------------------------- portable norms


def _portable_forward(self: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if weight is None:  # a constant scale, else the ONNX exporter builds ones with Shape + ConstantOfShape
        weight = torch.ones(self.normalized_shape, dtype=x.dtype, device=x.device)
    y = F.rms_norm(x, self.normalized_shape, weight, self.eps)
    return y + self.bias if self.bias is not None else y


def _portable_forward_2d(self: RMSNorm2d, x: torch.Tensor) -> torch.Tensor:
    return _portable_forward(self, x.movedim(1, -1)).movedim(-1, 1)


@contextlib.contextmanager
def portable_norms(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every RMSNorm of ``model`` computes with stock ``F.rms_norm`` + bias (aten ops that
    torch.export serializes and the ONNX exporter translates) instead of the package's custom-op kernel."""
    patched = []
    for mod in model.modules():
        if isinstance(mod, RMSNorm) and "forward" not in mod.__dict__:
            fn = _portable_forward_2d if isinstance(mod, RMSNorm2d) else _portable_forward
            mod.forward = types.MethodType(fn, mod)
            patched.append(mod)
    try:
        yield model
    finally:
        for mod in patched:
            mod.__dict__.pop("forward", None)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


# ----------------------------------------------------------------------------------- inputs and dims


def _named_tensors(model: nn.Module, args: tuple, kwargs: dict) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor leaf of (args, kwargs) in pytree order, named after the forward's
    parameters (``x``, ``input_ids``, ``pixel_values_0`` for a list...)."""
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    flat, _ = pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))
    named = []
    for path, leaf in flat:
        if not isinstance(leaf, torch.Tensor):
            continue
        first = path[1]
        if path[0].idx == 0:
            i = first.idx
            head = params[i] if i < len(params) else f"input{i}"
        else:
            head = str(first.key)
        rest = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path[2:]]
        named.append(("_".join([head, *rest]), leaf))
    return named


def dynamic_shapes_for(
    model: nn.Module, args: tuple, kwargs: dict, dynamic: bool = True
) -> dict[str, Any] | None:
    """A ``dynamic_shapes`` spec for torch.export: the batch dim (dim 0) of every tensor input free, and the
    sequence dim (dim 1) of token inputs (integer (B, T) tensors) and of (B, T, D) float inputs.

    ``Dim.AUTO`` lets torch.export keep a dim static where the model pins it (a ViT's token count)
    instead of failing; the dims that stayed free are read back from the exported program."""
    if not dynamic:
        return None
    auto = torch.export.Dim.AUTO

    def spec(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
            return None
        dims = {0: auto}
        if leaf.dim() >= 2 and (
            (not leaf.is_floating_point() and leaf.dim() == 2)
            or (leaf.is_floating_point() and leaf.dim() == 3)
        ):
            dims[1] = auto
        return dims

    try:
        combined = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except TypeError as e:
        raise ExportError(f"the example inputs do not fit {type(model).__name__}.forward: {e}") from e
    return {
        name: pytree.tree_map(spec, value, is_leaf=lambda x: x is None) for name, value in combined.items()
    }


def _user_input_vals(ep: torch.export.ExportedProgram) -> list[Any]:
    by_name = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    return [by_name[name].meta.get("val") for name in ep.graph_signature.user_inputs]


def _free_dims(
    ep: torch.export.ExportedProgram, named: list[tuple[str, torch.Tensor]]
) -> dict[str, dict[int, Any]]:
    """input name -> {dim: symbol} for the dims the exported program leaves free."""
    vals = [v for v in _user_input_vals(ep) if isinstance(v, torch.Tensor)]
    if len(vals) != len(named):
        return {}
    out = {}
    for (name, _), val in zip(named, vals, strict=True):
        free = {i: s.node.expr for i, s in enumerate(val.shape) if isinstance(s, torch.SymInt)}
        if free:
            out[name] = free
    return out


def _axis_names(free: dict[str, dict[int, Any]], named: list[tuple[str, torch.Tensor]]) -> dict[Any, str]:
    """symbol -> readable axis name: ``batch`` for dim 0, ``seq`` for dim 1, ``dim<k>`` beyond; free dims of the
    same position and example size share a name (an ``attention_mask`` has the ``batch`` and ``seq`` of the
    ``input_ids``), others get ``seq2``..."""
    tensors = dict(named)
    by_key: dict[tuple[int, int], str] = {}
    names: dict[Any, str] = {}
    for name, dims in free.items():
        for d, sym in sorted(dims.items()):
            key = (d, int(tensors[name].shape[d]))
            if key not in by_key:
                base = {0: "batch", 1: "seq"}.get(d, f"dim{d}")
                n_same = sum(1 for k in by_key if k[0] == d)
                by_key[key] = base if n_same == 0 else f"{base}{n_same + 1}"
            names.setdefault(sym, by_key[key])
    return names


def _pick_size(size: int, dim: int, lower: int, upper: Any) -> int:
    """Another size than ``size`` within [lower, upper]: batch + 1, other dims - 1 when they are > 3."""
    candidates = [size + 1, size - 1] if dim == 0 or size <= 3 else [size - 1, size + 1]
    for c in candidates:
        if c >= max(lower, 2) and (upper is None or c <= upper):
            return c
    return size


def _symbol_sizes(
    ep: torch.export.ExportedProgram, free: dict[str, dict[int, Any]], named: list[tuple[str, torch.Tensor]]
) -> dict[Any, int]:
    ranges = {}
    for sym, vr in ep.range_constraints.items():
        lo = int(vr.lower) if math.isfinite(float(vr.lower)) else 0
        hi = int(vr.upper) if math.isfinite(float(vr.upper)) else None
        ranges[sym] = (lo, hi)
    tensors = dict(named)
    sizes: dict[Any, int] = {}
    for name, dims in free.items():
        for d, sym in sorted(dims.items()):
            if sym in sizes or not getattr(sym, "is_symbol", False):
                continue
            lo, hi = ranges.get(sym, (0, None))
            sizes[sym] = _pick_size(int(tensors[name].shape[d]), d, lo, hi)
    return sizes


def fresh_inputs(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    free: dict[str, dict[int, Any]] | None = None,
    sizes: dict[Any, int] | None = None,
    seed: int = 1234,
) -> tuple[tuple, dict]:
    """New random inputs shaped like the examples, with the free dims resized (``sizes``: symbol -> size).

    Floats: standard normal.  Integer tensors named ``*mask*``: ones.  Other integer tensors (token ids):
    uniform over the range the example used, so every id stays valid."""
    gen = torch.Generator().manual_seed(seed)
    free, sizes = free or {}, sizes or {}
    named = iter(_named_tensors(model, args, kwargs))

    def make(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        name, _ = next(named)
        shape = list(leaf.shape)
        for d, sym in free.get(name, {}).items():
            shape[d] = sizes.get(sym, shape[d])
        if leaf.is_floating_point():
            return torch.randn(shape, generator=gen, dtype=leaf.dtype).to(leaf.device)
        if leaf.dtype == torch.bool or "mask" in name.lower():
            return torch.ones(shape, dtype=leaf.dtype, device=leaf.device)
        lo = int(leaf.min()) if leaf.numel() else 0
        hi = int(leaf.max()) + 1 if leaf.numel() else 1
        return torch.randint(lo, max(hi, lo + 1), shape, generator=gen, dtype=leaf.dtype).to(leaf.device)

    new_args, new_kwargs = pytree.tree_map(make, (tuple(args), dict(kwargs)))
    return tuple(new_args), dict(new_kwargs)


def _shapes(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, list[int]]:
    return {name: list(t.shape) for name, t in _named_tensors(model, args, kwargs)}


# ----------------------------------------------------------------------------------- helpers


def _versions(fmt: str) -> dict[str, str]:
    out = {"torch": torch.__version__}
    try:
        from importlib.metadata import version

        out["lightning_cbwc"] = version("lightning-cbwc")
    except Exception:
        pass
    if fmt == "onnx":
        for mod in ("onnx", "onnxruntime", "onnxscript"):
            try:
                out[mod] = __import__(mod).__version__
            except Exception:
                pass
    if fmt == "safetensors":
        try:
            out["safetensors"] = __import__("safetensors").__version__
        except Exception:
            pass
    return out


def _artefact_path(path: str | Path, fmt: str) -> Path:
    p = Path(path)
    if p.suffix.lower() == _SUFFIX[fmt]:
        return p
    if p.suffix.lower() in _SUFFIX.values():
        raise ExportError(
            f"{str(path)!r} has the suffix of another format than {fmt!r}: give a folder or a *{_SUFFIX[fmt]} file"
        )
    return p / f"model{_SUFFIX[fmt]}"


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            return t.dtype
    return None


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


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------------- plan (de)serialization


def plan_from_dict(data: Mapping[str, Any]) -> FoldPlan:
    """The :class:`FoldPlan` of ``plan.to_dict()`` (unknown keys are ignored)."""
    from_dict = getattr(FoldPlan, "from_dict", None)
    if callable(from_dict):
        return from_dict(data)
    site_fields = {f.name for f in dataclasses.fields(NormSite)}
    writer_fields = {f.name for f in dataclasses.fields(Writer)}
    sites = []
    for s in data.get("sites", []):
        kw = {k: v for k, v in s.items() if k in site_fields}
        kw["normalized_shape"] = tuple(kw.get("normalized_shape", ()))
        kw["writers"] = [
            Writer(**{k: v for k, v in w.items() if k in writer_fields}) for w in s.get("writers", [])
        ]
        sites.append(NormSite(**kw))
    return FoldPlan(sites=sites, model_type=data.get("model_type", ""))


def read_plan(path: str | Path) -> FoldPlan:
    p = Path(path)
    if p.is_dir():
        p = p / PLAN_FILE
    if not p.is_file():
        raise CheckpointError(
            f"no {PLAN_FILE} at {str(p)!r}: it is written beside the weights by export(..., 'safetensors')"
        )
    return plan_from_dict(json.loads(p.read_text()))


# ----------------------------------------------------------------------------------- architecture


def describe_architecture(model: nn.Module, hint: Any = None) -> dict[str, Any]:
    """A JSON description of how to build ``model``'s (unfolded) architecture.

    ``hint``: a dict (kept as is, e.g. ``{"kind": "timm", "name": "vit_tiny_patch16_224", "kwargs":
    {"img_size": 64}}``), a spec string (``timm:NAME``, ``pkg.module:factory``) or None (guess: a transformers
    model gives its config; a timm model its name, with default kwargs)."""
    dtype = _model_dtype(model)
    base: dict[str, Any] = {"class": f"{type(model).__module__}.{type(model).__qualname__}"}
    if dtype is not None:
        base["dtype"] = str(dtype).removeprefix("torch.")
    if isinstance(hint, Mapping):
        return {**base, **dict(hint)}
    if isinstance(hint, str):
        from ..specs import parse_spec

        spec = parse_spec(hint)
        if spec.kind == "timm":
            return {**base, "kind": "timm", "name": spec.target, "kwargs": {}}
        if spec.kind == "factory":
            return {**base, "kind": "factory", "spec": spec.target}
        # hf folders and checkpoint files: describe the model itself (its config is self-contained)
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is optional
        PreTrainedModel = ()  # type: ignore[assignment]
    if PreTrainedModel and isinstance(model, PreTrainedModel):
        return {**base, "kind": "hf", "hf_class": type(model).__name__, "config": model.config.to_dict()}
    cfg = getattr(model, "pretrained_cfg", None)
    if type(model).__module__.startswith("timm.") and isinstance(cfg, Mapping) and cfg.get("architecture"):
        return {
            **base,
            "kind": "timm",
            "name": cfg["architecture"],
            "kwargs": {},
            "note": "timm does not record create_model kwargs: defaults assumed",
        }
    return {**base, "kind": "unknown", "note": "pass a model factory to load_folded"}


def build_architecture(arch: Mapping[str, Any]) -> nn.Module:
    """Instantiate the (unfolded) architecture an ``architecture.json`` describes, with random weights."""
    kind = arch.get("kind")
    if kind == "timm":
        import timm

        model = timm.create_model(arch["name"], pretrained=False, **dict(arch.get("kwargs") or {}))
    elif kind == "hf":
        import transformers

        config = dict(arch["config"])
        config_cls = transformers.AutoConfig.for_model(config.pop("model_type")).__class__
        cfg = config_cls.from_dict(config)
        model = getattr(transformers, arch["hf_class"])(cfg)
    elif kind == "factory":
        from ..specs import load_factory

        model = load_factory(arch["spec"])
    else:
        raise CheckpointError(
            f"architecture.json does not say how to build the model ({arch.get('class', 'unknown class')}): "
            "pass a factory or a fresh module to load_folded(dir, factory)"
        )
    dtype = arch.get("dtype")
    if dtype:
        model = model.to(getattr(torch, dtype))
    return model.eval()


# ----------------------------------------------------------------------------------- safetensors


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, name, new)


def apply_structure(model: nn.Module, plan: FoldPlan, keys: set[str] | None = None) -> nn.Module:
    """Give a fresh (unfolded) ``model`` the module structure of its fold, without touching the weights:
    the plan's LayerNorms become RMSNorms (``fold.swap_norms``), tables centered at the lookup become
    :class:`CenteredEmbedding`, and, when the saved ``keys`` say so, norms whose affine was fused lose their
    weight/bias and linears that received a fused beta gain a bias."""
    from ..surgery import swap_norms

    for w in plan.writers:
        if w.kind != "embedding_lookup":
            continue
        emb = model.get_submodule(w.module)
        if isinstance(emb, CenteredEmbedding):
            continue
        if type(emb) is not nn.Embedding:
            raise CheckpointError(
                f"{w.module} is a {type(emb).__name__}, not an nn.Embedding: is it the architecture the plan was made for?"
            )
        _replace_module(model, emb, CenteredEmbedding.adopt(emb))
    todo = []
    for site in plan.foldable:
        try:
            mod = model.get_submodule(site.name)
        except AttributeError as e:
            raise CheckpointError(
                f"the model has no module {site.name!r} from plan.json: is it the architecture the plan was made for?"
            ) from e
        if not isinstance(mod, RMSNorm):
            todo.append(site)
    swap_norms(model, FoldPlan(sites=todo, model_type=plan.model_type))
    if keys is not None:
        for site in plan.foldable:
            norm = model.get_submodule(site.name)
            for attr in ("weight", "bias"):
                if getattr(norm, attr, None) is not None and f"{site.name}.{attr}" not in keys:
                    setattr(norm, attr, None)
            norm.elementwise_affine = norm.weight is not None or norm.bias is not None
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and mod.bias is None and f"{name}.bias" in keys:
                mod.bias = nn.Parameter(
                    torch.zeros(mod.out_features, dtype=mod.weight.dtype, device=mod.weight.device)
                )
    return model


def _safetensors_file(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    if (p / "model.safetensors").is_file():
        return p / "model.safetensors"
    found = sorted(p.glob("*.safetensors")) if p.is_dir() else []
    if len(found) == 1:
        return found[0]
    raise CheckpointError(f"no model.safetensors in {str(path)!r} (found {len(found)} *.safetensors files)")


def load_folded(
    path: str | Path,
    model_factory_or_module: Callable[[], nn.Module] | nn.Module | None = None,
    *,
    strict: bool = True,
) -> nn.Module:
    """Rebuild a folded model saved by ``export(..., "safetensors")``.

    ``path`` is the export folder (or its ``.safetensors`` file).  The architecture comes from
    ``model_factory_or_module`` (a fresh, unfolded instance or a no-argument factory) or else from
    ``architecture.json``; the norms named in ``plan.json`` are swapped for RMSNorms, then the weights are
    loaded strictly (tied weights saved once are re-tied by the architecture).  The model comes back in eval
    mode with ``cbwc_plan`` set."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    file = _safetensors_file(path)
    folder = file.parent
    plan = read_plan(folder / PLAN_FILE)
    if isinstance(model_factory_or_module, nn.Module):
        model = model_factory_or_module
    elif callable(model_factory_or_module):
        model = model_factory_or_module()
        if not isinstance(model, nn.Module):
            raise CheckpointError(f"the factory returned a {type(model).__name__}, not an nn.Module")
    else:
        arch_file = folder / ARCHITECTURE_FILE
        if not arch_file.is_file():
            raise CheckpointError(
                f"no {ARCHITECTURE_FILE} in {str(folder)!r}: pass the architecture as load_folded(dir, factory)"
            )
        model = build_architecture(json.loads(arch_file.read_text()))
    with safe_open(str(file), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata() or {}
    # tied keys dropped on save are listed in the metadata as key -> kept key
    keys |= {k for k, v in meta.items() if v in keys}
    apply_structure(model, plan, keys)
    dtype = meta.get("dtype")
    if dtype and hasattr(torch, dtype):
        model.to(getattr(torch, dtype))
    try:
        load_model(model, str(file), strict=strict)
    except RuntimeError as e:
        raise CheckpointError(f"{str(file)!r} does not fit the rebuilt {type(model).__name__}: {e}") from e
    model.eval()
    model.cbwc_plan = plan
    return model


# ----------------------------------------------------------------------------------- ONNX


def _onnx_norm_counts(proto: Any) -> dict[str, int]:
    """How many nodes of each normalization op the graph (and its local functions) holds."""
    norms = {
        "LayerNormalization",
        "RMSNormalization",
        "SimplifiedLayerNormalization",
        "SkipLayerNormalization",
    }
    nodes = [*proto.graph.node, *(n for fn in proto.functions for n in fn.node)]
    counts: dict[str, int] = {}
    for n in nodes:
        if n.op_type in norms:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _to_simplified_layer_norm(proto: Any) -> int:
    """Rename every RMSNormalization node to ORT's SimplifiedLayerNormalization (same inputs/attributes)."""
    n_renamed = 0
    for n in proto.graph.node:
        if n.op_type == "RMSNormalization" and n.domain in ("", "ai.onnx"):
            n.op_type = "SimplifiedLayerNormalization"
            n_renamed += 1
    return n_renamed


def _run_onnx(file: Path, model: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(file), so, providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    named = _named_tensors(model, args, kwargs)
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


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0][:400] if lines else type(e).__name__


# ----------------------------------------------------------------------------------- writers


@dataclass
class _Written:
    """What one format's writer produced: its files, the checked outputs and format-specific facts."""

    files: list[Path]
    ref: Any
    got: list[torch.Tensor]
    check_args: tuple
    check_kwargs: dict
    checked_with: str
    free: dict[str, dict[int, Any]] = field(default_factory=dict)
    opset: int | None = None
    norm_ops: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _write_safetensors(
    model: nn.Module, file: Path, args: tuple, kwargs: dict, fused: list[str], architecture: Any, seed: int
) -> _Written:
    from safetensors.torch import load_model, save_model

    factory = architecture if callable(architecture) and not isinstance(architecture, nn.Module) else None
    arch = describe_architecture(model, None if factory else architecture)
    if factory is not None:
        arch["factory"] = (
            f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', repr(factory))}"
        )
    meta = {"format": "pt", "producer": "lightning_cbwc.export", "fused_affine": json.dumps(fused)}
    if "dtype" in arch:
        meta["dtype"] = arch["dtype"]
    save_model(model, str(file), metadata=meta)  # tied tensors are saved once (listed in the metadata)
    _write_json(file.parent / ARCHITECTURE_FILE, arch)

    # eager PyTorch on both sides: any batch size works, so check on another one
    named = _named_tensors(model, args, kwargs)
    batches = {int(t.shape[0]) for _, t in named if t.dim() > 0}
    free = {n: {0: "batch"} for n, t in named if t.dim() > 0} if len(batches) == 1 else {}
    check_args, check_kwargs = fresh_inputs(
        model, args, kwargs, free, {"batch": max(batches, default=1) + 1}, seed
    )
    notes = []
    try:
        rebuilt = load_folded(file, factory)
        checked_with = "load_folded, architecture built " + (
            "by the factory" if factory else "from architecture.json"
        )
    except CBWCError as e:
        if architecture is not None:
            raise ExportError(f"the saved weights do not load back into the given architecture: {e}") from e
        notes.append(
            f"the architecture could not be rebuilt ({_first_line(e)}): checked by loading into a copy"
        )
        rebuilt = copy.deepcopy(model)
        with torch.no_grad():
            for t in rebuilt.state_dict().values():
                if t.is_floating_point():
                    t.fill_(float("nan"))  # every value must come from the file
        load_model(rebuilt, str(file), strict=True)
        checked_with = "safetensors.torch.load_model into a copy of the model"
    ref = run(model, check_args, check_kwargs)
    got = output_tensors(run(rebuilt, check_args, check_kwargs))
    return _Written(
        [file, file.parent / ARCHITECTURE_FILE], ref, got, check_args, check_kwargs, checked_with, notes=notes
    )


def _write_pt2(model: nn.Module, file: Path, args: tuple, kwargs: dict, dynamic: bool, seed: int) -> _Written:
    named = _named_tensors(model, args, kwargs)
    with portable_norms(model), _eval_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(
                model,
                tuple(args),
                kwargs,
                dynamic_shapes=dynamic_shapes_for(model, args, kwargs, dynamic),
                strict=False,
            )
        except Exception as e:
            raise ExportError(f"torch.export failed for {type(model).__name__}: {_first_line(e)}") from e
    torch.export.save(ep, str(file))
    loaded = torch.export.load(str(file))
    free = _free_dims(loaded, named)
    sizes = _symbol_sizes(loaded, free, named)
    check_args, check_kwargs = fresh_inputs(model, args, kwargs, free, sizes, seed)
    ref = run(model, check_args, check_kwargs)
    with torch.no_grad():
        got = output_tensors(loaded.module()(*check_args, **check_kwargs))
    return _Written([file], ref, got, check_args, check_kwargs, "torch.export.load(...).module()", free)


def _write_onnx(
    model: nn.Module,
    file: Path,
    args: tuple,
    kwargs: dict,
    dynamic: bool,
    opset: int,
    norm_op: str,
    seed: int,
) -> _Written:
    import onnx

    named = _named_tensors(model, args, kwargs)
    with portable_norms(model), _eval_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
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
                f"torch.onnx.export (dynamo) failed for {type(model).__name__}: {_first_line(e)}"
            ) from e
    ep = program.exported_program
    free = _free_dims(ep, named) if ep is not None else {}
    names = _axis_names(free, named)
    if names:
        program.rename_axes({str(sym): name for sym, name in names.items()})
    if norm_op == "SimplifiedLayerNormalization":
        proto = program.model_proto
        _to_simplified_layer_norm(proto)
        onnx.save_model(proto, str(file), save_as_external_data=proto.ByteSize() > 1_800_000_000)
    else:
        program.save(str(file))
    files = [file, *[p for p in [file.parent / (file.name + ".data")] if p.exists()]]

    proto = onnx.load(str(file), load_external_data=False)
    norm_ops = _onnx_norm_counts(proto)
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    sizes = _symbol_sizes(ep, free, named) if ep is not None else {}
    check_args, check_kwargs = fresh_inputs(model, args, kwargs, free, sizes, seed)
    ref = run(model, check_args, check_kwargs)
    try:
        got = _run_onnx(file, model, check_args, check_kwargs)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"onnxruntime cannot run {str(file)!r}: {_first_line(e)}") from e
    notes = []
    n_rms = sum(1 for m in model.modules() if isinstance(m, RMSNorm))
    if norm_ops.get(norm_op, 0) < n_rms and (opset_used >= 23 or norm_op != "RMSNormalization"):
        notes.append(f"{n_rms} RMSNorm modules but {norm_ops.get(norm_op, 0)} {norm_op} nodes in the graph")
    return _Written(
        files,
        ref,
        got,
        check_args,
        check_kwargs,
        "onnxruntime CPUExecutionProvider",
        free,
        opset_used,
        norm_ops,
        notes,
    )


# ----------------------------------------------------------------------------------- export


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

    ``path``: a folder (the artefact is ``model.<ext>``) or a file with the format's suffix; ``plan.json``
    (and, for safetensors, ``architecture.json``) and ``<artefact>.json`` (the check record) go beside it.
    ``format``: ``safetensors`` (weights; :func:`load_folded` rebuilds the model), ``pt2`` (torch.export
    program, dynamic batch/sequence dims when ``dynamic``) or ``onnx`` (dynamo exporter, ``opset`` >= 23 for
    ``RMSNormalization``).  The artefact is run against ``model`` on fresh random inputs (other batch and
    sequence sizes where the dims are dynamic); beyond ``tol`` (default: by dtype, 1e-4 for float32) it
    raises :class:`ExportError`.  ``architecture`` (safetensors): a dict or spec string for
    :func:`describe_architecture`, or a no-argument factory used for the round trip (not saved).
    ``fuse_affine`` is passed to ``fold`` with ``fold_first``: it moves each norm's beta into the linears it
    feeds, which an ONNX runtime needs to gain from RMSNormalization (see the module docstring)."""
    fmt = format.lower().removeprefix(".")
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")
    if fmt == "onnx" and onnx_norm_op not in ONNX_NORM_OPS:
        raise ExportError(f"onnx_norm_op must be one of {ONNX_NORM_OPS}, not {onnx_norm_op!r}")
    if fmt == "onnx" and opset < 23 and onnx_norm_op == "RMSNormalization":
        log.warning("opset %d < 23 has no RMSNormalization: the RMSNorms export as elementwise ops", opset)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = dict(example_kwargs or {})

    if fold_first:
        from ..folding import fold

        model = fold(model, args, kwargs or None, fuse_affine=fuse_affine)
    plan = plan if plan is not None else getattr(model, "cbwc_plan", None)
    fused = list(getattr(model, "cbwc_fused", []) or [])
    if fmt == "safetensors" and plan is None and any(isinstance(m, RMSNorm) for m in model.modules()):
        raise ExportError(
            "the model has RMSNorm modules but no fold plan: pass plan= (or export(..., fold_first=True)); "
            "load_folded needs plan.json to rebuild it"
        )

    file = _artefact_path(path, fmt)
    file.parent.mkdir(parents=True, exist_ok=True)
    if plan is not None:
        _write_json(file.parent / PLAN_FILE, plan.to_dict())
    if fmt == "safetensors":
        w = _write_safetensors(model, file, args, kwargs, fused, architecture, seed)
    elif fmt == "pt2":
        w = _write_pt2(model, file, args, kwargs, dynamic, seed)
    else:
        w = _write_onnx(model, file, args, kwargs, dynamic, opset, onnx_norm_op, seed)

    named = _named_tensors(model, args, kwargs)
    names = _axis_names(w.free, named)
    what = {"safetensors": "reloaded model", "pt2": "reloaded program", "onnx": "ONNX model"}[fmt]
    result = ExportResult(
        format=fmt,
        path=file,
        files=[*w.files, *([file.parent / PLAN_FILE] if plan is not None else [])],
        max_error=_compare(w.ref, w.got, what),
        tolerance=tol if tol is not None else tolerance(w.ref),
        check_shapes=_shapes(model, w.check_args, w.check_kwargs),
        example_shapes=_shapes(model, args, kwargs),
        dynamic_dims={
            n: {d: names.get(sym, str(sym)) for d, sym in dims.items()} for n, dims in w.free.items()
        },
        checked_with=w.checked_with,
        opset=w.opset,
        norm_ops=w.norm_ops,
        fused=fused,
        notes=w.notes,
        plan=plan,
    )
    if dynamic and fmt != "safetensors" and not w.free:
        result.notes.append("no input dim stayed dynamic: the model pins every dim it was exported with")
    record = file.parent / (file.name + ".json")
    _write_json(record, result.to_dict())
    result.files.append(record)
    if not result.ok:
        raise ExportError(
            f"the exported {fmt} artefact {str(file)!r} differs from the PyTorch model by {result.max_error:.3g} "
            f"(max |diff| / RMS(output) on fresh inputs {result.check_shapes}; tolerance {result.tolerance:.3g}); "
            f"the artefact and {record.name} are left for inspection",
            max_error=result.max_error,
            tolerance=result.tolerance,
        )
    return result
