"""How to rebuild a folded model's (unfolded) architecture: the ``architecture`` section of ``cbwc.json``.

Safetensors hold weights only; :func:`lightning_cbwc.export.load_folded` builds the architecture from this
description (a timm name and kwargs, a transformers config, or a ``pkg.module:factory`` spec), swaps the norms
the fold plan names, and loads the weights.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter or buffer (None when it has none)."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            return t.dtype
    return None


def _is_transformers_model(model: nn.Module) -> bool:
    # a PreTrainedModel implies transformers is imported: no need to import it (it is an optional dependency)
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def describe_architecture(model: nn.Module, hint: Any = None) -> dict[str, Any]:
    """A JSON description of how to build ``model``'s (unfolded) architecture.

    ``hint``: a dict (kept as is, e.g. ``{"kind": "timm", "name": "vit_tiny_patch16_224", "kwargs":
    {"img_size": 64}}``), a spec string (``timm:NAME``, ``pkg.module:factory``) or None (guess: a transformers
    model gives its config; a timm model its name, with default kwargs)."""
    dtype = model_dtype(model)
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
    if _is_transformers_model(model):
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
    """Instantiate the (unfolded) architecture that :func:`describe_architecture` described, with random
    weights, in eval mode."""
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
            "the architecture section of cbwc.json does not say how to build the model "
            f"({arch.get('class', 'unknown class')}): pass a factory or a fresh module to load_folded(dir, factory)"
        )
    dtype = arch.get("dtype")
    if dtype:
        model = model.to(getattr(torch, dtype))
    return model.eval()
