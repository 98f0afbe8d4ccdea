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
            return {**base, **_timm_record(model, spec.target)}
        if spec.kind == "factory":
            return {**base, "kind": "factory", "spec": spec.target}
        # hf folders and checkpoint files: describe the model itself (its config is self-contained)
    if _is_transformers_model(model):
        return {**base, "kind": "hf", "hf_class": type(model).__name__, "config": model.config.to_dict()}
    cfg = getattr(model, "pretrained_cfg", None)
    if type(model).__module__.startswith("timm.") and isinstance(cfg, Mapping) and cfg.get("architecture"):
        return {**base, **_timm_record(model, cfg["architecture"])}
    return {**base, "kind": "unknown", "note": "pass a model factory to load_folded"}


def _timm_kwargs_candidates(model: nn.Module) -> list[dict[str, Any]]:
    """create_model kwargs to try, since timm does not record them: the defaults, then the sizes the model
    itself shows (classes, input channels, image and patch size)."""
    seen: dict[str, Any] = {}
    if isinstance(getattr(model, "num_classes", None), int):
        seen["num_classes"] = model.num_classes
    patch = getattr(model, "patch_embed", None)
    proj = getattr(patch, "proj", None)
    if isinstance(getattr(proj, "in_channels", None), int):
        seen["in_chans"] = proj.in_channels
    for attr in ("img_size", "patch_size"):
        value = getattr(patch, attr, None)
        if isinstance(value, tuple | list) and value and all(isinstance(v, int) for v in value):
            seen[attr] = value[0] if len(set(value)) == 1 else list(value)
    small = {k: v for k, v in seen.items() if k in ("num_classes", "in_chans")}
    return [{}, small, seen]


def _builds_like(name: str, kwargs: dict[str, Any], model: nn.Module) -> bool:
    """True when ``timm.create_model(name, **kwargs)`` has every tensor of ``model`` with its shape."""
    import timm

    try:
        with torch.device("meta"):
            built = timm.create_model(name, pretrained=False, **kwargs)
    except Exception:  # timm raises many types for kwargs a model does not take
        return False
    shapes = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    return all(shapes.get(k) == tuple(v.shape) for k, v in model.state_dict().items())


def _timm_record(model: nn.Module, name: str) -> dict[str, Any]:
    """The timm part of the architecture record, with kwargs that rebuild ``model``'s shapes (checked); a
    model no candidate rebuilds is recorded as needing a factory."""
    for kwargs in _timm_kwargs_candidates(model):
        if _builds_like(name, kwargs, model):
            return {"kind": "timm", "name": name, "kwargs": kwargs}
    return {
        "kind": "unknown",
        "timm_name": name,
        "note": f"timm.create_model({name!r}) with the kwargs the model shows does not rebuild its shapes "
        "(timm does not record create_model kwargs): pass a model factory to load_folded",
    }


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
