"""LoRA (peft) with CBWC: keep the low-rank deltas of writer layers centered.

A LoRA delta on a writer is ``dW = s * B @ A`` with ``B`` of shape (out, r): centering ``B`` over its output
dim (dim 0) centers ``dW`` (for an embedding writer, ``lora_embedding_B`` (dim, r), also dim 0).  Both orders
work:

* peft first (the usual one: ``get_peft_model`` in ``__init__``, then the callback converts at setup): the
  analysis sees the frozen base layers and the LoRA matrices on the captured graph; the base writers are
  centered exactly once (they are frozen, so they never move) and the B matrices are projected after each step.
* peft after :func:`~lightning_cbwc.convert` (e.g. in ``configure_model``): the writer layers found by the
  analysis are looked up again through peft's ``base_layer``; :func:`prepare_` (called by the callback at
  ``on_fit_start`` and by :func:`~lightning_cbwc.attach`) removes parametrizations from the wrapped base layers
  (peft's merge writes into ``base_layer.weight.data``, which for a parametrized base is a temporary: the delta
  would be silently dropped) and centers the new B matrices.

Merging: :func:`merge_lora_` is the one merge path (any module with peft LoRA layers, a ``PeftModel`` or one
with adapters injected by ``inject_adapter_in_model``); :func:`merge_and_unload` is it plus peft's unwrapping.

Unsupported (:class:`~lightning_cbwc.UnsupportedError`): DoRA (``use_dora=True``: the magnitude vector rescales
the output channels of the writer after the centering) and inits that rewrite the base weights (PiSSA, OLoRA,
CorDA, LoftQ), and peft tuners other than LoRA.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize as P

from ..centering import center_, max_column_mean
from ..errors import UnsupportedError
from .parametrize import remove_output_centering, unparametrize_
from .state import converted_modules, owner, unparametrize

log = logging.getLogger("lightning_cbwc")

#: init_lora_weights values that modify the base weights
BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq")


def _peft_classes() -> tuple[type | None, type | None]:
    """peft's layer classes, or (None, None) while peft is not imported: then no module can be a peft layer
    (importing peft costs seconds, so a model without it never pays for it)."""
    if "peft" not in sys.modules:
        return None, None
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    return LoraLayer, BaseTunerLayer


def _configs(module: nn.Module) -> list[tuple[str, Any]]:
    out = []
    for mod in module.modules():
        cfgs = getattr(mod, "peft_config", None)
        if isinstance(cfgs, dict):
            out.extend(cfgs.items())
    return out


def check_peft(module: nn.Module) -> None:
    """Raise UnsupportedError for DoRA, base-modifying LoRA inits and non-LoRA peft tuners under ``module``."""
    LoraLayer, BaseTunerLayer = _peft_classes()
    if LoraLayer is None:
        return
    for adapter, cfg in _configs(module):
        init = getattr(cfg, "init_lora_weights", True)
        if getattr(cfg, "use_dora", False):
            raise UnsupportedError(
                f"peft adapter {adapter!r} uses DoRA (use_dora=True): its magnitude vector rescales the writer's "
                "output channels after the centering, which breaks LayerNorm equivalence. Use plain LoRA."
            )
        if isinstance(init, str) and init.lower().startswith(BASE_MODIFYING_INITS):
            raise UnsupportedError(
                f"peft adapter {adapter!r} uses init_lora_weights={init!r}, which rewrites the base weights: "
                "CBWC cannot keep them centered consistently. Use init_lora_weights=True (or 'gaussian')."
            )
    for name, mod in module.named_modules():
        if isinstance(mod, LoraLayer):
            if any(bool(v) for v in getattr(mod, "use_dora", {}).values()):
                raise UnsupportedError(
                    f"{name} uses DoRA (use_dora=True): not supported with CBWC (the magnitude vector rescales "
                    "the writer's output channels after the centering). Use plain LoRA."
                )
        elif isinstance(mod, BaseTunerLayer):
            raise UnsupportedError(
                f"{name} is a peft {type(mod).__name__}: only LoRA adapters are supported with CBWC."
            )


def lora_targets(layer: nn.Module) -> list[tuple[str, torch.Tensor, int]]:
    """(name relative to ``layer``, tensor, dim) of the LoRA B matrices (and LoRA B biases) of a peft layer."""
    out: list[tuple[str, torch.Tensor, int]] = []
    lora_b = getattr(layer, "lora_B", None)
    if isinstance(lora_b, nn.ModuleDict):
        for adapter, sub in lora_b.items():
            if isinstance(getattr(sub, "weight", None), torch.Tensor):
                out.append((f"lora_B.{adapter}.weight", sub.weight, 0))
            if isinstance(getattr(sub, "bias", None), torch.Tensor):
                out.append((f"lora_B.{adapter}.bias", sub.bias, 0))
    emb_b = getattr(layer, "lora_embedding_B", None)
    if isinstance(emb_b, nn.ParameterDict):
        for adapter, p in emb_b.items():
            out.append((f"lora_embedding_B.{adapter}", p, 0))
    return out


def lora_matrices(module: nn.Module) -> list[tuple[str, torch.Tensor, int]]:
    """(qualified name, tensor, dim) of the LoRA B matrices on the writer layers of every converted module
    under ``module``: centering each over its output dim keeps the delta B @ A centered."""
    out = []
    for prefix, mod, state in converted_modules(module):
        pre = f"{prefix}." if prefix else ""
        for w in state.writers:
            if w.kind == "parameter" or not w.param.endswith(".weight"):
                continue
            layer_path = w.param.rpartition(".")[0]
            try:
                layer = mod.get_submodule(layer_path)
            except AttributeError:
                continue
            out.extend((f"{pre}{layer_path}.{name}", t, dim) for name, t, dim in lora_targets(layer))
    return out


@torch.no_grad()
def prepare_(module: nn.Module) -> int:
    """Make a converted model safe after peft wrapped some of its writer layers; returns what it changed.

    Parametrized writers that now sit under a peft ``base_layer`` become plain (centered) parameters kept by
    projection, and every LoRA B matrix on a writer layer is centered exactly.  Idempotent.
    """
    check_peft(module)
    changed = 0
    for _, mod, state in converted_modules(module):
        keep = []
        for w in state.parametrized:
            base, attr = owner(mod, w.param)
            path = w.param.rpartition(".")[0]
            wrapped = base is not (mod.get_submodule(path) if path else mod)
            if wrapped and P.is_parametrized(base, attr):
                P.remove_parametrizations(base, attr, leave_parametrized=True)
                remove_output_centering(base)
                state.projected.append(w)
                changed += 1
            else:
                keep.append(w)
        state.parametrized = keep
    for _, t, dim in lora_matrices(module):
        if max_column_mean(t, dim) > 8 * torch.finfo(t.dtype).eps:
            center_(t, dim)
    if changed:
        log.info(
            "CBWC: %d parametrized writers are wrapped by peft: now kept centered by projection", changed
        )
    return changed


def merge_lora_(
    module: nn.Module, safe_merge: bool = True, adapter_names: list[str] | None = None
) -> nn.Module:
    """Merge every peft LoRA adapter under ``module`` into its base layer and put the base layer back, in place;
    returns ``module``.  A converted model stays centered and computes the same function.

    The Centering parametrizations are removed first (:func:`~lightning_cbwc.unparametrize`, which leaves deep
    copies' originals intact; peft's merge writes into ``base_layer.weight.data``, which for a parametrized base
    is a temporary: the delta would be dropped), then LoRA B matrices that are not centered are centered
    (:func:`prepare_`).  A model without peft layers only loses its parametrizations.  ``safe_merge`` and
    ``adapter_names`` go to peft's ``LoraLayer.merge``.
    """
    # converted modules under ``module`` (their state then lists the writers as projected), then the Centering
    # parametrizations of a part of a converted model passed alone
    unparametrize(module)
    unparametrize_(module)
    prepare_(module)
    LoraLayer, _ = _peft_classes()
    if LoraLayer is None:
        return module
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, LoraLayer):
                continue
            base = child.get_base_layer()
            if P.is_parametrized(base):
                raise UnsupportedError(
                    f"the base layer of {name} ({type(base).__name__}) has a parametrization that is not CBWC's: "
                    "peft's merge would drop the LoRA delta. Remove it before merging."
                )
            child.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            setattr(parent, name, base)
    _forget_merged_adapters(module)
    return module


def _merged_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part != "base_layer")


def _forget_merged_adapters(module: nn.Module) -> None:
    """After a merge, the converted modules' writer lists name the base layers where they now are and no
    longer list LoRA matrices that are gone."""
    for _, _, state in converted_modules(module):
        for attr in ("projected", "parametrized"):
            writers = [w for w in getattr(state, attr) if ".lora_" not in f".{w.param}"]
            setattr(
                state,
                attr,
                [
                    dataclasses.replace(w, param=_merged_name(w.param), module=_merged_name(w.module))
                    for w in writers
                ],
            )


def merge_and_unload(
    model: nn.Module, *, safe_merge: bool = False, adapter_names: list[str] | None = None, **kwargs: Any
) -> nn.Module:
    """peft's ``merge_and_unload`` for a converted ``PeftModel``: the merged model stays centered and equal.

    The adapters are merged by :func:`merge_lora_`; peft's ``merge_and_unload`` (``kwargs``, e.g.
    ``progressbar``) then only unwraps what is left (the ``PeftModel``, ``modules_to_save`` copies).
    For a model with adapters injected without a ``PeftModel`` (``inject_adapter_in_model``) use
    :func:`merge_lora_`.
    """
    if not hasattr(model, "merge_and_unload"):
        raise TypeError(
            f"{type(model).__name__} has no merge_and_unload: pass the PeftModel (or use merge_lora_)"
        )
    merge_lora_(model, safe_merge=safe_merge, adapter_names=adapter_names)
    return model.merge_and_unload(**kwargs)
