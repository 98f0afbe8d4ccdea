"""Example inputs for a model the CLI loads: parse ``--input-shape``, or guess from the model (a
transformers config's vocabulary, timm's input size, ``example_input_array``) and check the guess runs."""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import SpecError, first_line
from .verify import run


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...], int | None]:
    """Parse ``2,3,224,224`` (float input), ``int:2,16`` (token ids, vocab from the model's config) or
    ``int1000:2,16`` (token ids below 1000).  Returns ``(kind, shape, vocab)``."""
    kind, vocab, body = "float", None, text.strip()
    m = re.fullmatch(r"(float|int)(\d*):(.*)", body)
    if m:
        kind, body = m.group(1), m.group(3)
        if m.group(2):
            if kind != "int":
                raise SpecError(f"bad --input-shape {text!r}: only int inputs take a vocabulary size")
            vocab = int(m.group(2))
    try:
        shape = tuple(int(s) for s in body.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise SpecError(
            f"bad --input-shape {text!r}: give positive sizes like 2,3,224,224 (float) or int:2,16 (token ids)"
        )
    return kind, shape, vocab


def _config_int(config: Any, *names: str) -> int | None:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _forward_params(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _vocab_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return _config_int(config, "vocab_size") if config is not None else None


def _make_input(
    kind: str, shape: tuple[int, ...], vocab: int | None, gen: torch.Generator, model: nn.Module
) -> torch.Tensor:
    if kind == "int":
        vocab = vocab or _vocab_size(model)
        if vocab is None:
            raise SpecError(
                "int inputs need a vocabulary size and the model has no config.vocab_size: "
                "give it as --input-shape int<V>:2,16, e.g. int1000:2,16"
            )
        return torch.randint(vocab, shape, generator=gen)
    return torch.randn(shape, generator=gen)


def _check_fits(model: nn.Module, args: tuple, arch_spec: str, source: str) -> None:
    """Run ``model`` once on guessed inputs; a failure is the user's to fix with --input-shape (SpecError)."""
    try:
        run(model, args, {})
    except Exception as e:  # any error of the user's model on the guessed input
        shapes = ", ".join(str(tuple(a.shape)) for a in args)
        raise SpecError(
            f"{arch_spec} does not take the input {shapes} guessed from {source} ({type(e).__name__}: "
            f"{first_line(e, 200)}): pass --input-shape, e.g. --input-shape 2,3,32,32"
        ) from e


def example_inputs_for(
    model: nn.Module, input_shapes: Sequence[str] = (), seed: int = 0, arch_spec: str = "the model"
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` to capture ``model`` with, made with a fixed seed.

    Explicit ``input_shapes`` give positional inputs.  Otherwise: a transformers model gets token ids of its
    vocabulary (batch 2, ``min(32, max_position_embeddings)`` tokens) and an attention mask when its forward
    takes one; a timm model a batch of 2 images of its ``pretrained_cfg['input_size']``; any model with an
    ``example_input_array`` (the LightningModule convention) that.
    """
    gen = torch.Generator().manual_seed(seed)
    if input_shapes:
        return tuple(_make_input(*parse_input_shape(s), gen, model) for s in input_shapes), {}

    config = getattr(model, "config", None)
    if config is not None and _vocab_size(model) is not None and hasattr(model, "get_input_embeddings"):
        vocab = _vocab_size(model)
        positions = _config_int(config, "max_position_embeddings", "n_positions", "max_seq_len") or 32
        ids = torch.randint(vocab, (2, min(32, positions)), generator=gen)
        params = _forward_params(model)
        kwargs: dict[str, Any] = {"input_ids": ids}
        if "attention_mask" in params:
            kwargs["attention_mask"] = torch.ones_like(ids)
        if getattr(config, "use_cache", False) and "use_cache" in params:
            kwargs["use_cache"] = False  # capture without a KV cache; the config keeps its own setting
        if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
            kwargs["decoder_input_ids"] = ids.clone()
        return (), kwargs

    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("input_size"):
        size = list(cfg["input_size"])
        own = getattr(
            getattr(model, "patch_embed", None), "img_size", None
        )  # timm create_model(img_size=...)
        if isinstance(own, tuple | list) and len(own) == 2 and all(isinstance(v, int) for v in own):
            size[1:] = own
        x = torch.randn((2, *size), generator=gen)
        _check_fits(model, (x,), arch_spec, "its pretrained_cfg input_size")
        return (x,), {}

    example = getattr(model, "example_input_array", None)
    if example is not None:
        if isinstance(example, Mapping):
            return (), dict(example)
        if isinstance(example, tuple | list):
            return tuple(example), {}
        return (example,), {}

    raise SpecError(
        f"cannot tell what input {arch_spec} takes: pass --input-shape, e.g. --input-shape 2,3,224,224 "
        "(float) or --input-shape int:2,16 (token ids); or give the model an example_input_array"
    )
