"""The recipes' always-on callbacks, :class:`RunSummary` (one JSON file per run) and :class:`ExportFolded`, and
:class:`PlainRMSNorm`, the plain-RMSNorm baseline of the comparisons."""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_cbwc.surgery import swap_every_norm
from recipes._export import export_folded

log = logging.getLogger("lightning_cbwc.recipes")

#: the template every output path defaults to; the CLI fills in ``--run_dir``
RUN_DIR = "{run_dir}"


def _metrics(trainer: L.Trainer, prefix: str) -> dict[str, float]:
    out = {}
    for k, v in trainer.callback_metrics.items():
        if k.startswith(prefix):
            out[k] = float(v.item() if isinstance(v, torch.Tensor) else v)
    return out


def _batch_size(batch: Any) -> dict[str, int | None]:
    """Samples in a training batch (the first input's leading dim) and, for token inputs, tokens."""
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return {"samples": None, "tokens": None}
    tokens = x.numel() if not x.is_floating_point() else None
    return {"samples": int(x.shape[0]), "tokens": tokens}


class RunSummary(Callback):
    """Writes one JSON file with what a comparison of runs needs: the training loss curve (every
    ``log_every_n_steps``), validation metrics after every validation, the step-0 validation (when the CLI
    ran ``validate_before_fit``), test metrics, the training batch size (samples, and tokens for token
    inputs), and the median / mean time of a training step (forward,
    backward, optimizer step and whatever callbacks do in ``on_train_batch_end`` before this one, e.g. CBWC's
    projection), skipping the first ``skip_steps``.

    Args:
        path: where to write the JSON (None: nothing is written, the data stay in ``self.data``).
        log_every_n_steps: period of the training-loss curve.
        skip_steps: warm-up steps left out of the step time.
    """

    def __init__(
        self, path: str | None = f"{RUN_DIR}/summary.json", log_every_n_steps: int = 10, skip_steps: int = 5
    ):
        self.path = path
        self.log_every_n_steps = max(1, log_every_n_steps)
        self.skip_steps = skip_steps
        self.data: dict[str, Any] = {"train": [], "val": [], "step0": None, "test": None}
        self._t0 = 0.0
        self._step_ms: list[float] = []
        self._fit_t0: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.data, "step_ms": self._step_ms}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.data = state_dict.get("data", self.data)
        self._step_ms = state_dict.get("step_ms", [])

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_t0 = time.perf_counter()
        self.data["params"] = sum(p.numel() for p in pl_module.parameters())
        self.data["trainable_params"] = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._step_ms.append((time.perf_counter() - self._t0) * 1e3)
        if "batch" not in self.data:
            self.data["batch"] = _batch_size(batch)
        step = trainer.global_step
        if step % self.log_every_n_steps == 0 or step == 1:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if isinstance(loss, torch.Tensor):
                self.data["train"].append({"step": step, "epoch": trainer.current_epoch, "loss": float(loss)})

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        entry = {"step": trainer.global_step, "epoch": trainer.current_epoch, **_metrics(trainer, "val/")}
        if trainer.state.fn == "validate" and trainer.global_step == 0:
            self.data["step0"] = entry
            self.write()
        elif trainer.state.fn == "fit":
            self.data["val"].append(entry)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.data["test"] = {"step": trainer.global_step, **_metrics(trainer, "test/")}
        self.write()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._fit_t0 is not None:
            self.data["fit_seconds"] = time.perf_counter() - self._fit_t0
        times = self._step_ms[self.skip_steps :] or self._step_ms
        if times:
            self.data["step_ms"] = {
                "median": statistics.median(times),
                "mean": statistics.fmean(times),
                "steps": len(times),
            }
        self.data["steps"] = trainer.global_step
        self.write()

    def write(self) -> None:
        if not self.path or (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_rank() != 0
        ):
            return
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.data, indent=1) + "\n")


class ExportFolded(Callback):
    """At the end of fit: fold the trained network into CBWC + RMSNorm, check it, write it, time it.

    The network is ``pl_module.net`` called on ``pl_module.example_input_array`` (see
    :func:`recipes._export.export_folded`).  Writes ``DIR/model.safetensors``, with ``onnx`` in ``formats``
    ``DIR/model.onnx``, each checked against the folded model by ``lightning_cbwc.export``, and the sidecar
    ``DIR/cbwc.json`` with the fold plan (``plan``) and the ``report``: the plan's summary, the max error of
    the folded model vs the trained one, the artefacts' errors and the LN-vs-folded PyTorch latency.

    Args:
        dirpath: output folder.
        enabled: set false to skip the export.
        formats: ``safetensors`` and/or ``onnx``.
        fuse_affine: also fuse the norms' gamma/beta into the linears they feed (an ONNX runtime gains from
            RMSNormalization only then: a kept beta costs an Add).
        latency_batch: batch size of the LN-vs-folded timing (0: no timing).
        latency_repeats: timed calls per model.
    """

    def __init__(
        self,
        dirpath: str | None = f"{RUN_DIR}/export",
        enabled: bool = True,
        formats: list[str] | None = None,
        fuse_affine: bool = False,
        latency_batch: int = 64,
        latency_repeats: int = 20,
    ) -> None:
        self.dirpath = dirpath
        self.enabled = enabled
        self.formats = list(formats) if formats is not None else ["safetensors"]
        unknown = set(self.formats) - {"safetensors", "onnx"}
        if unknown:
            raise ValueError(f"unknown export format(s) {sorted(unknown)}: use safetensors and/or onnx")
        self.fuse_affine = fuse_affine
        self.latency_batch = latency_batch
        self.latency_repeats = latency_repeats
        self.report: dict[str, Any] | None = None
        self.folded: nn.Module | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or not self.dirpath or not trainer.is_global_zero:
            return
        if trainer.interrupted:
            return
        self.report, self.folded = export_folded(
            pl_module,
            Path(self.dirpath),
            formats=self.formats,
            fuse_affine=self.fuse_affine,
            latency_batch=self.latency_batch,
            latency_repeats=self.latency_repeats,
        )
        msg = f"exported the folded model to {self.dirpath} (max error {self.report['max_error']:.3g}"
        if "latency_ms" in self.report:
            lat = self.report["latency_ms"]
            msg += f"; latency at batch {self.latency_batch}: " + ", ".join(
                f"{k} {v:.2f} ms" for k, v in lat.items()
            )
        log.info(msg + ")")
        print(msg + ")")


class PlainRMSNorm(Callback):
    """The baseline CBWC is compared with: at setup, every LayerNorm of ``pl_module.<model_attr>`` becomes an
    RMSNorm with the same weight, bias and eps, and nothing is centered (what people pick instead of LayerNorm;
    it changes the model's function, a pretrained one's at step 0).  Add it to an LN config:
    ``--trainer.callbacks+=recipes._callbacks.PlainRMSNorm --export.enabled=false`` (there is nothing to fold).

    Args:
        model_attr: the network attribute of the LightningModule (None: the LightningModule itself).
    """

    def __init__(self, model_attr: str | None = "net") -> None:
        self.model_attr = model_attr
        self.swapped: list[str] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.swapped:
            return
        net = getattr(pl_module, self.model_attr) if self.model_attr else pl_module
        self.swapped = swap_every_norm(net)
        if not self.swapped:
            raise ValueError(f"PlainRMSNorm: {type(net).__name__} has no LayerNorm to swap")
        log.info("PlainRMSNorm: %d LayerNorms swapped for RMSNorm (no centering)", len(self.swapped))
