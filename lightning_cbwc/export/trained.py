"""Export a model trained with CBWC (the callback's ``export_dir``): un-parametrized copy, artefacts, and the
``training`` section of ``cbwc.json``."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..training.monitor import layer_norm_gap, swapped_norms
from ..training.state import converted_modules
from . import export
from .converted import inference_copy
from .formats import save_safetensors
from .sidecar import update_sidecar

log = logging.getLogger("lightning_cbwc")


def equivalence_error(module: nn.Module, example: tuple[tuple, dict]) -> float:
    """Largest relative difference, over the exact swapped norms of ``module`` on the example inputs, between
    each RMSNorm's output and what LayerNorm would compute on the same input (0 up to rounding when all is well;
    approximate sites of ``replace="all"`` are not LayerNorm by design and are left out)."""
    return layer_norm_gap(module, swapped_norms(module, "exact").values(), *example)


def export_trained(
    module: nn.Module,
    out_dir: str | os.PathLike,
    *,
    formats: Sequence[str] = ("safetensors",),
    example: tuple[tuple, dict] | None = None,
) -> dict[str, Any]:
    """Write a converted model to ``out_dir`` and return what was written.

    The model is copied and un-parametrized first (centered plain weights, norms already swapped, the
    architecture's own state-dict keys).  A model converted as a whole has one fold plan: each format goes
    to :func:`lightning_cbwc.export.export`, which checks the artefact against the model.  A model whose
    converted parts are submodules (a LightningModule around its network, several networks) has no single
    plan: its safetensors are written as ``model.safetensors`` by :func:`.formats.save_safetensors` (pt2 and
    ONNX, which need no plan, still go to ``export``).  The ``training`` section of ``cbwc.json`` records the
    mode, the plans and the measured equivalence error: over the swapped norms on the example inputs,
    max |RMSNorm(x) - LayerNorm(x)| / RMS.
    """
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    dup = inference_copy(module, example)
    convs = converted_modules(dup)
    error = equivalence_error(dup, example) if example is not None else None
    written: dict[str, Any] = {}
    args, kwargs = example if example is not None else ((), {})
    plan = convs[0][2].plan if len(convs) == 1 and convs[0][0] == "" else None
    for fmt in formats:
        if plan is not None or fmt != "safetensors":
            written[fmt] = str(export(dup, out, fmt, args, kwargs, plan=plan).path)
        else:
            path = os.path.join(out, "model.safetensors")
            save_safetensors(dup, path, {"producer": "lightning_cbwc.export.trained"})
            written[fmt] = path
    training = {
        "mode": convs[0][2].mode if convs else "",
        "replace": convs[0][2].replace if convs else "foldable",
        "equivalence_error": error,
        "plans": {name: state.plan.to_dict() for name, _, state in convs},
    }
    written["info"] = str(update_sidecar(out, training=training))
    written["equivalence_error"] = error
    log.info("CBWC: exported %s to %s (equivalence error %s)", sorted(formats), out, error)
    return written
