"""Model specs: turn a string such as ``timm:vit_tiny_patch16_224`` into a model and its example inputs.

Forms of a spec:

- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False)`` (random weights; never downloads).
- ``hf:DIR``: a transformers model saved in a local folder (``save_pretrained``); never downloads.
- ``pkg.module:factory``: imports ``pkg.module`` (the working directory is importable) and calls
  ``factory()``, which returns an ``nn.Module``.
- ``PATH.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` with ``arch=SPEC``: the architecture from
  ``SPEC``, its weights from the file (a Lightning ``.ckpt`` ``state_dict`` prefix such as ``model.`` is
  stripped when that makes the keys match).

Everything here is a plain function of its arguments: the CLI is a thin layer over it.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, SpecError, first_line
from .examples import example_inputs_for

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
SPEC_FORMS = "timm:NAME, hf:LOCAL_DIR, pkg.module:factory, or a .safetensors/.pt/.ckpt file with --arch SPEC"
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_MAX_KEYS_SHOWN = 5


@dataclass(frozen=True)
class Spec:
    """A parsed spec: ``kind`` is timm, hf, factory or checkpoint; ``target`` the name, folder, import path
    or file."""

    kind: str
    target: str
    text: str


@dataclass
class LoadedModel:
    """A model in eval mode with the example inputs to capture it with."""

    model: nn.Module
    example_inputs: tuple[Any, ...]
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    spec: str = ""


# --------------------------------------------------------------------------------------------- parsing


def parse_spec(text: str) -> Spec:
    """Parse a spec string; raise :class:`SpecError` naming the accepted forms when it is none of them."""
    text = text.strip()
    if not text:
        raise SpecError(f"empty model spec: use {SPEC_FORMS}")
    if text.startswith("timm:"):
        name = text[len("timm:") :]
        if not name:
            raise SpecError("timm: needs a model name, e.g. timm:vit_tiny_patch16_224")
        return Spec("timm", name, text)
    if text.startswith("hf:"):
        folder = text[len("hf:") :]
        if not folder:
            raise SpecError("hf: needs a local folder, e.g. hf:./my-gpt2 (a save_pretrained output)")
        return Spec("hf", folder, text)
    if text.lower().endswith(CHECKPOINT_SUFFIXES):
        return Spec("checkpoint", text, text)
    if _FACTORY_RE.match(text):
        return Spec("factory", text, text)
    if os.path.exists(text):
        raise SpecError(
            f"{text!r} is a file or folder but not a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}); "
            f"for a transformers folder use hf:{text}"
        )
    raise SpecError(f"unknown model spec {text!r}: use {SPEC_FORMS}")


# --------------------------------------------------------------------------------------------- loading


def load(spec: str, arch: str | None = None, input_shapes: Sequence[str] = (), seed: int = 0) -> LoadedModel:
    """Load the model a spec names, in eval mode, with example inputs made with a fixed ``seed``."""
    parsed = parse_spec(spec)
    if parsed.kind != "checkpoint" and arch is not None:
        raise SpecError(f"--arch is only for checkpoint files; {spec!r} already names the architecture")
    torch.manual_seed(seed)
    model = load_model(parsed, arch)
    model.eval()
    args, kwargs = example_inputs_for(model, input_shapes, seed=seed, arch_spec=arch or spec)
    return LoadedModel(model, args, kwargs, spec)


def load_model(spec: Spec | str, arch: str | None = None) -> nn.Module:
    """The ``nn.Module`` a spec names (not yet in eval mode)."""
    if isinstance(spec, str):
        spec = parse_spec(spec)
    if spec.kind == "timm":
        return load_timm(spec.target)
    if spec.kind == "hf":
        return load_hf(spec.target)
    if spec.kind == "factory":
        return load_factory(spec.target)
    if not Path(spec.target).is_file():
        raise SpecError(f"no such checkpoint file: {spec.target!r}")
    if arch is None:
        raise SpecError(
            f"checkpoint {spec.target!r} needs --arch SPEC naming its architecture, "
            "e.g. --arch timm:vit_tiny_patch16_224"
        )
    arch_spec = parse_spec(arch)
    if arch_spec.kind == "checkpoint":
        raise SpecError(f"--arch {arch!r} is a checkpoint; it must name an architecture ({SPEC_FORMS})")
    model = load_model(arch_spec)
    load_checkpoint(model, spec.target, arch=arch)
    return model


def load_timm(name: str) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=False)
    except RuntimeError as e:
        if "Unknown model" not in str(e):
            raise
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; timm.list_models() lists them"
        raise SpecError(f"timm has no model {name!r}{hint}") from e


def _is_causal_lm(config: Any) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures or [])


def load_hf(folder: str) -> nn.Module:
    """A transformers model from a local folder (never the hub), in float32; its config is left as saved
    (the example inputs pass ``use_cache=False``, so artefacts keep the user's ``use_cache``)."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise SpecError(
            f"hf:{folder} is not a local folder; lightning-cbwc never downloads: "
            "save the model with save_pretrained and pass hf:/path/to/that/folder"
        )
    if not (path / "config.json").is_file():
        raise SpecError(f"hf:{folder} has no config.json; is it a save_pretrained folder?")
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise SpecError(f"hf:{folder}: cannot read its config.json: {e}") from e
    auto = AutoModelForCausalLM if _is_causal_lm(config) else AutoModel
    try:
        return auto.from_pretrained(path, config=config, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise SpecError(f"hf:{folder}: {auto.__name__} cannot load it: {e}") from e


def load_factory(target: str) -> nn.Module:
    """Import ``pkg.module`` and call ``factory`` (a dotted attribute path) with no arguments."""
    module_name, _, attr_path = target.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # like `python -m`: modules of the working directory are importable
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise SpecError(
                f"cannot import {module_name!r} for spec {target!r}: no module named {e.name!r}"
            ) from e
        raise
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise SpecError(f"{module_name!r} has no attribute {attr_path!r} (spec {target!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SpecError(f"{target!r} is not callable; it must be a function or class returning an nn.Module")
    try:
        inspect.signature(obj).bind()
    except TypeError as e:
        raise SpecError(f"{target!r} must be callable with no arguments: {e}") from e
    except ValueError:
        pass  # no signature (a builtin): just call it
    model = obj()
    if not isinstance(model, nn.Module):
        raise SpecError(f"{target!r} returned {type(model).__name__}, not an nn.Module")
    return model


# ----------------------------------------------------------------------------------------- checkpoints


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: safetensors, a plain state dict, or a Lightning ``.ckpt``."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"no such checkpoint file: {str(path)!r}")
    if p.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{str(path)!r} is not a readable safetensors file: {e}") from e
    with open(p, "rb") as f:
        head = f.read(2)
    if not zipfile.is_zipfile(p) and not head.startswith(b"\x80"):  # neither torch.save's zip nor a pickle
        raise CheckpointError(
            f"{str(path)!r} is not a PyTorch checkpoint (no torch.save archive or pickle inside: corrupt, "
            "truncated, or another format); use a .safetensors file or torch.save(model.state_dict(), path)"
        )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(
            f"torch.load(weights_only=True) refuses {str(path)!r} ({first_line(e, None)}); "
            "re-save it as torch.save(model.state_dict(), path) or as safetensors"
        ) from e
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{str(path)!r} holds no tensors")
    return tensors


def _tied_groups(model: nn.Module) -> list[set[str]]:
    """Groups of state-dict keys whose tensors are the same storage (tied weights)."""
    groups: dict[tuple[int, int, tuple[int, ...]], set[str]] = {}
    for k, t in model.state_dict().items():
        if t.numel():
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            groups.setdefault(ident, set()).add(k)
    return [g for g in groups.values() if len(g) > 1]


def _candidate_prefixes(keys: Sequence[str], depth: int = 3) -> list[str]:
    found: dict[str, int] = {}
    for k in keys:
        parts = k.split(".")
        for i in range(1, min(depth, len(parts) - 1) + 1):
            prefix = ".".join(parts[:i]) + "."
            found[prefix] = found.get(prefix, 0) + 1
    return sorted(found, key=lambda p: (-found[p], len(p)))


def match_state_dict(
    state: Mapping[str, torch.Tensor], expected: Sequence[str], optional: set[str] = frozenset()
) -> dict[str, torch.Tensor] | None:
    """``state`` re-keyed to ``expected`` (stripping one common prefix if that makes them match, keys in
    ``optional`` may be absent), or None when no such re-keying exists."""
    want = set(expected)

    def fits(keys: set[str]) -> bool:
        return keys <= want and not (want - keys - optional)

    if fits(set(state)):
        return dict(state)
    for prefix in _candidate_prefixes(list(state)):
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if fits(set(sub)):
            return sub
    return None


def _show(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - _MAX_KEYS_SHOWN} more)" if len(keys) > _MAX_KEYS_SHOWN else ""
    return ", ".join(keys[:_MAX_KEYS_SHOWN]) + more


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str], arch: str = "the model") -> None:
    """Load a checkpoint file into ``model``; raise :class:`CheckpointError` naming the mismatched keys."""
    state = read_state_dict(path)
    expected = list(model.state_dict())
    tied = _tied_groups(model)
    aliases = set().union(*tied) if tied else set()
    matched = match_state_dict(state, expected, optional=aliases)
    if matched is not None and any(not (g & set(matched)) for g in tied):
        matched = None  # a tied group with none of its keys in the checkpoint
    if matched is None:
        # report against the best-aligned view of the checkpoint: the prefix that leaves the fewest misfits
        views = {"": dict(state)}
        for p in _candidate_prefixes(list(state)):
            views[p] = {k[len(p) :]: v for k, v in state.items() if k.startswith(p)}
        prefix = min(views, key=lambda p: len(set(views[p]) ^ set(expected)))
        best = views[prefix]
        covered = {k for g in tied if g & set(best) for k in g}  # tied keys saved under another name
        missing = [k for k in expected if k not in best and k not in covered]
        unexpected = [k for k in best if k not in set(expected)]
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_show(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_show(unexpected)}")
        if prefix:
            parts.append(f"(keys compared after stripping the prefix {prefix!r})")
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match --arch {arch}: {'; '.join(parts)}. "
            "Fix: pass the --arch the checkpoint was saved from (same model and config)"
        )
    own = model.state_dict()
    bad = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in matched.items()
        if tuple(v.shape) != tuple(own[k].shape)
    ]
    if bad:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match --arch {arch}: {len(bad)} shape mismatch(es) "
            f"(checkpoint vs model): {_show(bad)}. Fix: pass the --arch (and config) it was saved from"
        )
    model.load_state_dict(matched, strict=False)  # only tied keys may be absent: their twin loads them
