"""Rebuild a folded model from its safetensors: architecture, then the fold's module structure, then weights.

The folder holds ``model.safetensors`` and ``cbwc.json``, whose ``plan`` section names the norms to swap and
the tables centered at the lookup, and whose ``architecture`` section says how to build the unfolded model
(unless the caller passes a factory or a fresh module).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..analysis import FoldPlan
from ..errors import CheckpointError, FoldingError
from ..norm import RMSNorm
from ..surgery import center_lookups, swap_norms
from .architecture import build_architecture
from .sidecar import SIDECAR, read_sidecar, sidecar_path


def _follow_saved_keys(model: nn.Module, plan: FoldPlan, keys: set[str]) -> None:
    """Norms whose affine was fused lose the weight/bias the file lacks; linears that received a fused beta
    gain the bias the file has."""
    for site in plan.swapped:
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


def apply_structure(model: nn.Module, plan: FoldPlan, keys: set[str] | None = None) -> nn.Module:
    """Give a fresh (unfolded) ``model`` the module structure of its fold, without touching the weights:
    the plan's LayerNorms become RMSNorms (``surgery.swap_norms``), tables centered at the lookup become
    :class:`CenteredEmbedding`, and, when the saved ``keys`` say so, norms whose affine was fused lose their
    weight/bias and linears that received a fused beta gain a bias."""
    try:
        center_lookups(model, plan)
    except FoldingError as e:
        raise CheckpointError(f"{e}: is it the architecture the plan was made for?") from e
    todo = []
    for site in plan.swapped:
        try:
            mod = model.get_submodule(site.name)
        except AttributeError as e:
            raise CheckpointError(
                f"the model has no module {site.name!r} from the fold plan: is it the architecture the plan was made for?"
            ) from e
        if not isinstance(mod, RMSNorm):
            todo.append(site)
    swap_norms(model, FoldPlan(sites=todo, model_type=plan.model_type))
    if keys is not None:
        _follow_saved_keys(model, plan, keys)
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


def _section(folder: Path, name: str, fix: str) -> Any:
    if not sidecar_path(folder).is_file():
        raise CheckpointError(
            f"no {SIDECAR} in {str(folder)!r}: it is written beside the weights by export(..., 'safetensors') "
            "(or lightning-cbwc fold)"
        )
    section = read_sidecar(folder).get(name)
    if not isinstance(section, dict):
        raise CheckpointError(f"{str(sidecar_path(folder))!r} has no {name!r} section: {fix}")
    return section


def read_plan(folder: str | Path) -> FoldPlan:
    """The fold plan recorded in the ``plan`` section of ``folder``'s ``cbwc.json``."""
    fix = "export the folded model again with export(..., 'safetensors')"
    return FoldPlan.from_dict(_section(Path(folder), "plan", fix))


def _build(folder: Path, source: Callable[[], nn.Module] | nn.Module | None) -> nn.Module:
    if isinstance(source, nn.Module):
        return source
    if callable(source):
        model = source()
        if not isinstance(model, nn.Module):
            raise CheckpointError(f"the factory returned a {type(model).__name__}, not an nn.Module")
        return model
    fix = "pass the architecture as load_folded(dir, factory)"
    return build_architecture(_section(folder, "architecture", fix))


def _pt2_file(path: str | Path) -> Path | None:
    """The ``.pt2`` program ``path`` names (the file, or a folder holding ``model.pt2`` and no safetensors)."""
    p = Path(path)
    if p.suffix == ".pt2":
        return p
    if p.is_dir() and (p / "model.pt2").is_file() and not (p / "model.safetensors").is_file():
        return p / "model.pt2"
    return None


def load_program(file: str | Path) -> nn.Module:
    """A ``.pt2`` export, runnable in a fresh process: the modules its ``cbwc.json`` record lists (the
    pytree types of an HF ``ModelOutput``) are imported before ``torch.export.load``."""
    file = Path(file)
    record = (read_sidecar(file.parent).get("exports") or {}).get("pt2") or {}
    for name in record.get("imports", []):
        importlib.import_module(name)
    try:
        return torch.export.load(str(file)).module()
    except Exception as e:
        raise CheckpointError(f"{str(file)!r} does not load as a torch.export program: {e}") from e


def load_folded(
    path: str | Path,
    model_factory_or_module: Callable[[], nn.Module] | nn.Module | None = None,
    *,
    strict: bool = True,
) -> nn.Module:
    """Rebuild a folded model saved by ``export(..., "safetensors")``, or load a ``.pt2`` export.

    ``path`` is the export folder (or its ``.safetensors`` / ``.pt2`` file; a folder with only a ``.pt2``
    program loads that, through :func:`load_program`).  The architecture comes from
    ``model_factory_or_module`` (a fresh, unfolded instance or a no-argument factory) or else from the
    ``architecture`` section of ``cbwc.json``; the norms its ``plan`` section names are swapped for RMSNorms,
    then the weights are loaded strictly (tied weights saved once are re-tied by the architecture).  The model
    comes back in eval mode with ``cbwc_plan`` set."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    program = _pt2_file(path)
    if program is not None and model_factory_or_module is None:
        return load_program(program)
    file = _safetensors_file(path)
    plan = read_plan(file.parent)
    model = _build(file.parent, model_factory_or_module)
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
