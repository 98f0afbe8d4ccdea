"""The recipes' end-of-fit export: fold the trained network, check it, write it, time LN vs folded.

Everything is written by the library: the artefacts by :func:`lightning_cbwc.export.export`, the fold plan
and the measurements as the ``plan`` and ``report`` sections of the export folder's sidecar ``cbwc.json``
(:func:`lightning_cbwc.export.sidecar.update_sidecar`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from torch import nn

import lightning_cbwc
from lightning_cbwc.export import export
from lightning_cbwc.export.converted import inference_copy
from lightning_cbwc.export.sidecar import update_sidecar
from lightning_cbwc.export.trained import equivalence_error
from lightning_cbwc.inputs import split_inputs
from lightning_cbwc.norm import RMSNorm
from lightning_cbwc.timing import batch_of, compare_latency
from lightning_cbwc.training import merge_lora_
from lightning_cbwc.training.state import converted_state
from lightning_cbwc.verify import max_relative_error, run

log = logging.getLogger("lightning_cbwc.recipes")


def write_artifacts(
    model: nn.Module, dirpath: Path, formats: Sequence[str], example: tuple, factory: Callable | None = None
) -> dict[str, dict[str, Any]]:
    """Write ``model`` (folded) in each format through :func:`lightning_cbwc.export.export`, which checks every
    artefact against the model.  Returns format -> {path, max_error, ok} or {error}; a failed format does not
    stop the others."""
    out: dict[str, dict[str, Any]] = {}
    for fmt in formats:
        try:
            kwargs = {"architecture": factory} if factory is not None and fmt == "safetensors" else {}
            result = export(model, dirpath, fmt, example, **kwargs)
            out[fmt] = {"path": str(result.path), "max_error": float(result.max_error), "ok": bool(result.ok)}
        except Exception as e:  # the run stays a success; the report says why
            log.warning("export to %s failed: %s: %s", fmt, type(e).__name__, e)
            out[fmt] = {"error": f"{type(e).__name__}: {e}"}
    return out


def reference_net(pl_module: L.LightningModule, net: nn.Module) -> nn.Module | None:
    """A fresh LayerNorm network (``pl_module.build_net()``) holding ``net``'s weights, or None."""
    build = getattr(pl_module, "build_net", None)
    if build is None:
        return None
    ref = build()
    try:
        ref.load_state_dict(net.state_dict(), strict=True)
    except RuntimeError as e:
        log.warning("could not load the trained weights into a fresh LayerNorm network: %s", e)
        return None
    return ref.eval()


def _has_rms_norm(model: nn.Module) -> bool:
    return any(isinstance(m, RMSNorm) for m in model.modules())


def export_folded(
    pl_module: L.LightningModule,
    dirpath: Path,
    formats: Sequence[str] = ("safetensors",),
    fuse_affine: bool = False,
    latency_batch: int = 64,
    latency_repeats: int = 20,
) -> tuple[dict[str, Any], nn.Module]:
    """Fold ``pl_module.net`` (a copy) into CBWC + RMSNorm, check it, write it; returns (report, folded).

    The trained network is copied and its LoRA adapters merged (:func:`lightning_cbwc.training.merge_lora_`,
    which also removes CBWC's parametrizations).  What gets folded is a LayerNorm network: the trained one
    itself, or, when it trained as CBWC + RMSNorm (it holds RMSNorms), a fresh LayerNorm build
    (``pl_module.build_net()``) holding its weights.  A network trained with ``CBWC(replace="all")`` computes
    a function of its own (its approximate sites are RMSNorms by design): it is exported in its trained form,
    the LayerNorm build kept only as the latency reference.  ``max_error`` is the largest relative difference of the
    folded network from the trained one and from that LayerNorm network.
    """
    args, _ = split_inputs(pl_module.example_input_array)
    example = tuple(e.cpu() for e in args)
    trained = merge_lora_(copy.deepcopy(pl_module.net)).cpu().float().eval()
    trained_with_cbwc = _has_rms_norm(trained)  # converted for training (post-LN models keep some LayerNorms)
    ln = reference_net(pl_module, trained) if trained_with_cbwc else trained
    state = converted_state(trained)
    if state is not None and state.plan.approximate:
        # replace="all": the trained function is not the LayerNorm network's, so the export is the trained
        # network itself in inference form; its exact sites must still compute LayerNorm's function.
        folded = inference_copy(trained, (example, {}))
        plan = converted_state(folded).plan
        if fuse_affine:
            log.warning("fuse_affine is not applied to a replace='all' network (exported as trained)")
    else:
        folded = lightning_cbwc.fold(
            ln if ln is not None else trained, example, fuse_affine=fuse_affine, check=True
        )
        plan = folded.cbwc_plan
    out = run(folded, example, None)
    errors = {"vs_trained": max_relative_error(run(trained, example, None), out)}
    if state is not None and state.plan.approximate:
        errors["exact_sites_vs_layernorm"] = equivalence_error(folded, (example, {}))
    elif ln is not None and ln is not trained:
        errors["vs_layernorm"] = max_relative_error(run(ln, example, None), out)
    report: dict[str, Any] = {
        "plan": plan.summary(),
        "max_error": max(errors.values()),
        "errors": errors,
        "fuse_affine": fuse_affine,
        "trained_with_cbwc": trained_with_cbwc,
    }
    report["artifacts"] = write_artifacts(
        folded, dirpath, formats, example, getattr(pl_module, "build_net", None)
    )
    if latency_batch > 0:
        big = tuple(batch_of(e, latency_batch) for e in example)
        models = (
            {"layernorm": ln, "folded": folded} if ln is not None else {"trained": trained, "folded": folded}
        )
        report["latency_batch"] = latency_batch
        report["latency_ms"] = compare_latency(models, big, repeats=latency_repeats)
    update_sidecar(dirpath, plan=plan.to_dict(), report=report)
    return report, folded
