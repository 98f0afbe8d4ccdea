"""The writers of the export formats: safetensors (weights) and pt2 (a torch.export program); ONNX is in
:mod:`.onnx`.  Each writes its artefact, runs it on fresh inputs and hands back what the check needs.

:func:`save_safetensors` is the package's one safetensors writer (``export``, the callback's export at fit
end, ``lightning-cbwc fold`` and the recipes all save through it).
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CBWCError, ExportError, first_line
from ..verify import eval_mode, output_tensors, run
from .architecture import describe_architecture
from .load import load_folded
from .portable import portable_norms
from .shapes import dynamic_shapes_for, free_dims, fresh_inputs, named_tensors, symbol_sizes
from .sidecar import SIDECAR, update_sidecar

FORMATS = ("safetensors", "pt2", "onnx")
SUFFIX = {"safetensors": ".safetensors", "pt2": ".pt2", "onnx": ".onnx"}


def save_safetensors(
    model: nn.Module | Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Write ``model``'s state dict (or a state dict) to ``path``; return the aliases ``{key: kept key}``.

    A tensor tied to an earlier key (GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``, a module
    registered under two names) is stored once, under its first key; the metadata lists each dropped key as
    ``key -> kept key``, as ``safetensors.torch.save_model`` does, so ``safetensors.torch.load_model`` and
    :func:`load_folded` load the file into the (tied) architecture.  Views that share memory without being the
    same tensor are stored as copies."""
    from safetensors.torch import save_file

    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for key, t in state.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.device.type != "meta" and t.numel() else 0
        ident = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if ptr and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ptr:
            seen[ident] = key
            if ptr in storages:  # part of a tensor already kept: save_file refuses shared memory
                t = t.clone()
            storages.add(ptr)
        tensors[key] = t.contiguous().cpu()
    meta = {"format": "pt", **dict(metadata or {})}
    for key, kept in aliases.items():
        meta.setdefault(key, kept)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return aliases


def artefact_path(path: str | Path, fmt: str) -> Path:
    """``path`` itself when it has the format's suffix, else ``path/model.<suffix>``."""
    p = Path(path)
    if p.suffix.lower() == SUFFIX[fmt]:
        return p
    if p.suffix.lower() in SUFFIX.values():
        raise ExportError(
            f"{str(path)!r} has the suffix of another format than {fmt!r}: give a folder or a *{SUFFIX[fmt]} file"
        )
    return p / f"model{SUFFIX[fmt]}"


@dataclass
class Written:
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
    imports: list[str] = field(default_factory=list)


def pytree_modules(ep: torch.export.ExportedProgram) -> list[str]:
    """The modules defining the container types of a program's inputs and outputs (an HF ``ModelOutput``):
    ``torch.export.load`` in a fresh process needs them imported first (their pytree registration)."""
    found: set[str] = set()

    def walk(spec: Any) -> None:
        if spec is None or spec.is_leaf():
            return
        module = getattr(spec.type, "__module__", "") or ""
        if module.split(".")[0] not in ("builtins", "torch", "collections"):
            found.add(module)
        for child in spec.children():
            walk(child)

    walk(ep.call_spec.in_spec)
    walk(ep.call_spec.out_spec)
    return sorted(found)


def _describe(model: nn.Module, architecture: Any) -> tuple[dict[str, Any], Any]:
    """(the architecture section, the factory to rebuild with or None) for ``export(architecture=...)``."""
    factory = architecture if callable(architecture) and not isinstance(architecture, nn.Module) else None
    arch = describe_architecture(model, None if factory else architecture)
    if factory is not None:
        arch["factory"] = (
            f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', repr(factory))}"
        )
    return arch, factory


def _reload_into_copy(model: nn.Module, file: Path) -> nn.Module:
    """A copy of ``model`` whose every floating-point value comes from ``file``."""
    from safetensors.torch import load_model

    rebuilt = copy.deepcopy(model)
    with torch.no_grad():
        for t in rebuilt.state_dict().values():
            if t.is_floating_point():
                t.fill_(float("nan"))
    load_model(rebuilt, str(file), strict=True)
    return rebuilt


def write_safetensors(
    model: nn.Module, file: Path, args: tuple, kwargs: dict, fused: list[str], architecture: Any, seed: int
) -> Written:
    """Weights to ``file``, the architecture to ``cbwc.json``; rebuilt with :func:`load_folded` and checked on
    another batch size (eager PyTorch on both sides: any batch size works)."""
    arch, factory = _describe(model, architecture)
    meta = {"producer": "lightning_cbwc.export", "fused_affine": json.dumps(fused)}
    if "dtype" in arch:
        meta["dtype"] = arch["dtype"]
    save_safetensors(model, file, meta)
    update_sidecar(file.parent, architecture=arch)

    named = named_tensors(model, args, kwargs)
    batches = {int(t.shape[0]) for _, t in named if t.dim() > 0}
    free = {n: {0: "batch"} for n, t in named if t.dim() > 0} if len(batches) == 1 else {}
    sizes = {"batch": max(batches, default=1) + 1}
    check_args, check_kwargs = fresh_inputs(model, args, kwargs, free, sizes, seed)
    notes = []
    try:
        rebuilt = load_folded(file, factory)
        checked_with = "load_folded, architecture built " + (
            "by the factory" if factory else f"from {SIDECAR}"
        )
    except CBWCError as e:
        if architecture is not None:
            raise ExportError(f"the saved weights do not load back into the given architecture: {e}") from e
        notes.append(
            f"the architecture could not be rebuilt ({first_line(e)}): checked by loading into a copy"
        )
        rebuilt = _reload_into_copy(model, file)
        checked_with = "safetensors.torch.load_model into a copy of the model"
    ref = run(model, check_args, check_kwargs)
    got = output_tensors(run(rebuilt, check_args, check_kwargs))
    return Written([file], ref, got, check_args, check_kwargs, checked_with, notes=notes)


def write_pt2(model: nn.Module, file: Path, args: tuple, kwargs: dict, dynamic: bool, seed: int) -> Written:
    """A torch.export program (portable norms, eval mode) to ``file``, reloaded and run on fresh inputs."""
    named = named_tensors(model, args, kwargs)
    with portable_norms(model), eval_mode(model), warnings.catch_warnings():
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
            raise ExportError(f"torch.export failed for {type(model).__name__}: {first_line(e)}") from e
    torch.export.save(ep, str(file))
    loaded = torch.export.load(str(file))
    free = free_dims(loaded, named)
    sizes = symbol_sizes(loaded, free, named)
    check_args, check_kwargs = fresh_inputs(model, args, kwargs, free, sizes, seed)
    ref = run(model, check_args, check_kwargs)
    with torch.no_grad():
        got = output_tensors(loaded.module()(*check_args, **check_kwargs))
    imports = pytree_modules(ep)
    return Written(
        [file], ref, got, check_args, check_kwargs, "torch.export.load(...).module()", free, imports=imports
    )
