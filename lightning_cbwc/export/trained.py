"""Export a model trained with CBWC (the callback's ``export_dir``): un-parametrized copy, artefacts, record."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..errors import CBWCError
from ..norm import RMSNorm, RMSNorm2d
from ..training.state import converted_modules, unparametrize
from ..verify import relative_error


@torch.no_grad()
def equivalence_error(module: nn.Module, example: tuple[tuple, dict]) -> float:
    """Largest relative difference, over the swapped norms of ``module`` on the example inputs, between each
    RMSNorm's output and what LayerNorm would compute on the same input (0 up to rounding when all is well)."""
    worst = [0.0]

    def hook(norm: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        x, y = inputs[0], out
        if isinstance(norm, RMSNorm2d):
            x, y = x.movedim(1, -1), y.movedim(1, -1)
        ref = F.layer_norm(
            x.double(),
            norm.normalized_shape,
            None if norm.weight is None else norm.weight.double(),
            None if norm.bias is None else norm.bias.double(),
            norm.eps,
        )
        worst[0] = max(worst[0], relative_error(ref, y))

    handles = []
    for _, mod, state in converted_modules(module):
        for name in state.norms:
            norm = mod.get_submodule(name)
            if isinstance(norm, RMSNorm):
                handles.append(norm.register_forward_hook(hook))
    was = module.training
    module.eval()
    try:
        args, kwargs = example
        module(*args, **kwargs)
    finally:
        module.train(was)
        for h in handles:
            h.remove()
    return worst[0]


def _export_copy(module: nn.Module) -> nn.Module:
    """A deep copy of a converted module without parametrizations (centered plain weights); a LightningModule's
    trainer is shared, not copied."""

    trainer = module.__dict__.get("_trainer")
    memo = {id(trainer): trainer} if trainer is not None else {}
    dup = copy.deepcopy(module, memo)
    unparametrize(dup)
    return dup


def _write_safetensors(module: nn.Module, path: str) -> dict[str, str]:
    """Plain state dict -> safetensors; tensors tied to an earlier key are stored once (aliases in metadata)."""
    from safetensors.torch import save_file

    tensors, aliases, seen = {}, {}, {}
    for k, v in module.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if key in seen and v.numel():
            aliases[k] = seen[key]
            continue
        seen[key] = k
        tensors[k] = v.detach().contiguous().cpu()
    save_file(tensors, path, metadata={"format": "pt", "cbwc_aliases": json.dumps(aliases)})
    return aliases


def export_trained(
    module: nn.Module,
    out_dir: str | os.PathLike,
    *,
    formats: Sequence[str] = ("safetensors",),
    example: tuple[tuple, dict] | None = None,
) -> dict[str, Any]:
    """Write a converted model to ``out_dir`` and return what was written.

    The model is copied and un-parametrized first (centered plain weights, norms already swapped, the
    architecture's own state-dict keys).  Each format goes to ``lightning_cbwc.export.export`` (which checks
    the artefact against the model) when that module exists; otherwise ``"safetensors"`` is written here as
    ``model.safetensors``.  ``cbwc_training.json`` records the mode, the plans and the measured equivalence
    error: over the swapped norms on the example inputs, max |RMSNorm(x) - LayerNorm(x)| / RMS.
    """
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    dup = _export_copy(module)
    convs = converted_modules(dup)
    error = equivalence_error(dup, example) if example is not None else None
    meta: dict[str, Any] = {
        "format": "lightning_cbwc",
        "mode": convs[0][2].mode if convs else "",
        "equivalence_error": error,
        "plans": {name: state.plan.to_dict() for name, _, state in convs},
        "artefacts": {},
    }
    try:
        from ..export import export as _export
    except ImportError:
        _export = None
    written: dict[str, Any] = {}
    args, kwargs = example if example is not None else ((), {})
    plan = convs[0][2].plan if len(convs) == 1 and convs[0][0] == "" else None
    for fmt in formats:
        if _export is not None and (plan is not None or fmt != "safetensors"):
            result = _export(dup, out, fmt, args, kwargs, plan=plan)
            written[fmt] = str(result.path)
            meta["artefacts"][fmt] = {"path": str(result.path), "max_error": result.max_error}
        elif fmt == "safetensors":
            path = os.path.join(out, "model.safetensors")
            meta["aliases"] = _write_safetensors(dup, path)
            written[fmt] = path
            meta["artefacts"][fmt] = {"path": path}
        else:
            raise CBWCError(f"CBWC: export format {fmt!r} needs lightning_cbwc.export, which is missing")
    info = os.path.join(out, "cbwc_training.json")
    with open(info, "w") as f:
        json.dump(meta, f, indent=2, default=str)
    written["info"] = info
    written["equivalence_error"] = error
    rank_zero_info(f"CBWC: exported {sorted(formats)} to {out} (equivalence error {error})")
    return written
