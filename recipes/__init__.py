"""Training recipes: LightningCLI programs with YAML configs in ``configs/``.

    python recipes/image_classification.py fit -c configs/image_classification_cbwc.yaml
    lightning-cbwc run image_classification -c configs/image_classification_cbwc.yaml   # the same

What every recipe shares lives here:

- :class:`RecipeCLI`: a LightningCLI with a ``run_dir`` (every output path defaults to a ``{run_dir}``
  template), loggers (CSV + offline Weights & Biases) and three always-on callbacks with their own config
  sections: ``checkpoint`` (ModelCheckpoint), ``summary`` (:class:`RunSummary`) and ``export``
  (:class:`ExportFolded`).  ``test_after_fit`` and ``validate_before_fit`` add a test / step-0 validation.
- :class:`RunSummary`: curves, final metrics and the training step time, as one JSON file.
- :class:`ExportFolded`: at the end of fit, folds the trained network (CBWC + RMSNorm, checked against the
  unfolded one), writes it as safetensors (and ONNX where ``lightning_cbwc.export`` is available) and times
  LN-vs-folded inference.

The recipes' LightningModules keep the network in ``self.net`` (an ``nn.Module`` called as
``net(*example_input_array)`` that returns a tensor) and can rebuild a fresh LayerNorm copy with ``build_net()``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from torch import nn

log = logging.getLogger("lightning_cbwc.recipes")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
RUN_DIR = "{run_dir}"


# ------------------------------------------------------------------------------------------ optimization


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices (ndim >= 2), none on biases, norms and scalars."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0
):
    """Linear warm-up to the base learning rate, then cosine decay to ``min_ratio`` of it at ``total_steps``."""
    total_steps = max(1, int(total_steps))
    warmup_steps = max(0, min(int(warmup_steps), total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def adamw_warmup_cosine(
    module: L.LightningModule, lr: float, weight_decay: float, warmup_steps: int, betas=(0.9, 0.999)
) -> dict[str, Any]:
    """``configure_optimizers`` result shared by the recipes: AdamW, per-step warm-up + cosine schedule."""
    optimizer = torch.optim.AdamW(param_groups(module, weight_decay), lr=lr, betas=tuple(betas))
    total = module.trainer.estimated_stepping_batches if module._trainer is not None else 1000
    if not math.isfinite(total):
        total = 1000
    scheduler = warmup_cosine(optimizer, warmup_steps, int(total))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# -------------------------------------------------------------------------------------------- timing


def batch_of(example: Any, batch: int) -> Any:
    """The example input(s) tiled along dim 0 to ``batch`` rows (a tensor, or a tuple of tensors)."""
    if isinstance(example, torch.Tensor):
        reps = math.ceil(batch / example.shape[0])
        return example.repeat(reps, *([1] * (example.dim() - 1)))[:batch].contiguous()
    if isinstance(example, tuple | list):
        return tuple(batch_of(e, batch) for e in example)
    raise TypeError(f"cannot batch an example input of type {type(example).__name__}")


def as_args(example: Any) -> tuple:
    return tuple(example) if isinstance(example, tuple | list) else (example,)


@torch.inference_mode()
def compare_latency(
    models: dict[str, Callable], args: tuple, repeats: int = 20, warmup: int = 3
) -> dict[str, float]:
    """Median milliseconds per call of each model on ``args``, measured side by side.

    Rounds rotate the order, and each model runs 3 times in a row per round with the first call untimed, so
    no model is timed right after another one (ONNX Runtime's or OpenMP's threads still spinning from it,
    its data in the caches); see :mod:`lightning_cbwc.timing`.
    """
    from lightning_cbwc.timing import interleaved

    calls = {k: (lambda m=m: m(*args)) for k, m in models.items()}
    times = interleaved(calls, rounds=repeats, warmup=warmup, block=3)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


# ------------------------------------------------------------------------------------------ callbacks


def _metrics(trainer: L.Trainer, prefix: str) -> dict[str, float]:
    out = {}
    for k, v in trainer.callback_metrics.items():
        if k.startswith(prefix):
            out[k] = float(v.item() if isinstance(v, torch.Tensor) else v)
    return out


class RunSummary(Callback):
    """Writes one JSON file with what a comparison of runs needs: the training loss curve (every
    ``log_every_n_steps``), validation metrics after every validation, the step-0 validation (when the CLI
    ran ``validate_before_fit``), test metrics, and the median / mean time of a training step (forward,
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


def remove_parametrizations(model: nn.Module) -> nn.Module:
    """Bake every ``torch.nn.utils.parametrize`` parametrization into a plain parameter (in place)."""
    from torch.nn.utils import parametrize

    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every peft LoRA adapter into its base layer and put the base layer back (in place; bake
    parametrizations first: peft's merge drops the delta of a parametrized base layer)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                child.merge(safe_merge=True)
                setattr(parent, name, child.get_base_layer())
    return model


def write_artifacts(
    model: nn.Module, dirpath: Path, formats: Sequence[str], example: tuple, factory: Callable | None = None
) -> dict[str, dict[str, Any]]:
    """Write ``model`` (folded) in each format through ``lightning_cbwc.export.export``, which checks every
    artefact against the model; without that module, safetensors via ``save_model`` and nothing else.
    Returns format -> {path, max_error, ok} or {error}; a failed format does not stop the others."""
    try:
        from lightning_cbwc.export import export
    except ImportError:
        export = None
    out: dict[str, dict[str, Any]] = {}
    for fmt in formats:
        try:
            if export is None:
                if fmt != "safetensors":
                    raise RuntimeError("lightning_cbwc.export is not available in this version")
                from safetensors.torch import save_model

                dirpath.mkdir(parents=True, exist_ok=True)
                save_model(model, str(dirpath / "model.safetensors"))
                out[fmt] = {"path": str(dirpath / "model.safetensors")}
                continue
            kwargs = {"architecture": factory} if factory is not None and fmt == "safetensors" else {}
            result = export(model, dirpath, fmt, example, **kwargs)
            out[fmt] = {"path": str(result.path), "max_error": float(result.max_error), "ok": bool(result.ok)}
        except Exception as e:  # the run stays a success; the report says why
            log.warning("export to %s failed: %s: %s", fmt, type(e).__name__, e)
            out[fmt] = {"error": f"{type(e).__name__}: {e}"}
    return out


class ExportFolded(Callback):
    """At the end of fit: fold the trained network into CBWC + RMSNorm, check it, write it, time it.

    The network is ``pl_module.net`` called on ``pl_module.example_input_array`` (see :func:`export_folded`).
    Writes ``DIR/model.safetensors`` (+ ``plan.json``, ``architecture.json``), with ``onnx`` in ``formats``
    ``DIR/model.onnx``, each checked against the folded model by ``lightning_cbwc.export``, and
    ``DIR/report.json``: the fold plan, the max error of the folded model vs the trained one, the artefacts'
    errors and the LN-vs-folded PyTorch latency.

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
        self.report = export_folded(
            pl_module,
            Path(self.dirpath),
            formats=self.formats,
            fuse_affine=self.fuse_affine,
            latency_batch=self.latency_batch,
            latency_repeats=self.latency_repeats,
            sink=self,
        )
        msg = f"exported the folded model to {self.dirpath} (max error {self.report['max_error']:.3g}"
        if "latency_ms" in self.report:
            lat = self.report["latency_ms"]
            msg += f"; latency at batch {self.latency_batch}: " + ", ".join(
                f"{k} {v:.2f} ms" for k, v in lat.items()
            )
        log.info(msg + ")")
        print(msg + ")")


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


def export_folded(
    pl_module: L.LightningModule,
    dirpath: Path,
    formats: Sequence[str] = ("safetensors",),
    fuse_affine: bool = False,
    latency_batch: int = 64,
    latency_repeats: int = 20,
    sink: Any = None,
) -> dict[str, Any]:
    """Fold ``pl_module.net`` (a copy) into CBWC + RMSNorm, check it, write it; returns the report.

    The trained network is copied, its parametrizations baked in and its LoRA adapters merged.  What gets
    folded is a LayerNorm network: the trained one itself, or, when it trained as CBWC + RMSNorm (it holds
    RMSNorms), a fresh LayerNorm build (``pl_module.build_net()``) holding its weights.  ``max_error`` is the largest relative
    difference of the folded network from the trained one and from that LayerNorm network.
    """
    import lightning_cbwc
    from lightning_cbwc.verify import max_relative_error, run

    example = tuple(e.cpu() for e in as_args(pl_module.example_input_array))
    trained = merge_lora(remove_parametrizations(copy.deepcopy(pl_module.net))).cpu().float().eval()
    trained_with_cbwc = _has_rms_norm(trained)  # converted for training (post-LN models keep some LayerNorms)
    ln = reference_net(pl_module, trained) if trained_with_cbwc else trained
    folded = lightning_cbwc.fold(
        ln if ln is not None else trained, example, fuse_affine=fuse_affine, check=True
    )
    plan = folded.cbwc_plan
    out = run(folded, example, None)
    errors = {"vs_trained": max_relative_error(run(trained, example, None), out)}
    if ln is not None and ln is not trained:
        errors["vs_layernorm"] = max_relative_error(run(ln, example, None), out)
    dirpath.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "plan": plan.summary(),
        "max_error": max(errors.values()),
        "errors": errors,
        "fuse_affine": fuse_affine,
        "trained_with_cbwc": trained_with_cbwc,
    }
    (dirpath / "plan.json").write_text(plan.to_json() + "\n")
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
    (dirpath / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    if sink is not None:
        sink.folded = folded
    return report


def _has_rms_norm(model: nn.Module) -> bool:
    from lightning_cbwc.norm import RMSNorm

    return any(isinstance(m, RMSNorm) for m in model.modules())


# ---------------------------------------------------------------------------------------------- CLI


def _substitute(value: Any, run_dir: str) -> Any:
    """``{run_dir}`` replaced in every string of a (nested) config."""
    if isinstance(value, str):
        return value.replace(RUN_DIR, run_dir)
    if isinstance(value, Namespace):
        for k, v in vars(value).items():
            setattr(value, k, _substitute(v, run_dir))
        return value
    if isinstance(value, list):
        return [_substitute(v, run_dir) for v in value]
    if isinstance(value, tuple):
        return tuple(_substitute(v, run_dir) for v in value)
    if isinstance(value, dict):
        return {k: _substitute(v, run_dir) for k, v in value.items()}
    return value


def default_loggers(project: str = "lightning-cbwc") -> list[dict[str, Any]]:
    """CSV and offline Weights & Biases (no network; ``wandb sync DIR/wandb/offline-run-*`` uploads later)."""
    return [
        {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": RUN_DIR, "name": "csv"},
        },
        {
            "class_path": "lightning.pytorch.loggers.WandbLogger",
            "init_args": {"save_dir": RUN_DIR, "offline": True, "project": project},
        },
    ]


class RecipeCLI(LightningCLI):
    """The recipes' LightningCLI: ``run_dir`` templating, default loggers, checkpoint / summary / export.

    Extra top-level options:
        --run_dir DIR            where everything goes; any config string with ``{run_dir}`` gets DIR.
        --test_after_fit BOOL    run ``trainer.test`` on the final weights after ``fit``.
        --validate_before_fit BOOL  validate before the first step (the step-0 metric; with CBWC, after the
                                 conversion), recorded by ``summary``.
    """

    recipe = "recipe"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_dir", type=str, default=f"runs/{self.recipe}", help="folder for every output"
        )
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="test the final weights after fit"
        )
        parser.add_argument(
            "--validate_before_fit", type=bool, default=False, help="validate once before training (step 0)"
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(RunSummary, "summary")
        parser.add_lightning_class_args(ExportFolded, "export")
        parser.set_defaults(
            {
                "trainer.default_root_dir": RUN_DIR,
                "trainer.logger": default_loggers(),
                "checkpoint.dirpath": f"{RUN_DIR}/checkpoints",
                "checkpoint.save_last": True,
                "checkpoint.enable_version_counter": False,
                "checkpoint.filename": "best",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        self.add_recipe_arguments(parser)

    def add_recipe_arguments(self, parser: LightningArgumentParser) -> None:
        """Recipe-specific links and defaults."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        run_dir = config.get("run_dir") or f"runs/{self.recipe}"
        for key in ("trainer", "checkpoint", "summary", "export", "model", "data"):
            if key in config and config[key] is not None:
                config[key] = _substitute(config[key], run_dir)

    def before_fit(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("validate_before_fit"):
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)

    def after_fit(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("test_after_fit") and not self.trainer.interrupted:
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=True)


def script_main(module_name: str) -> None:
    """Run ``recipes.<name>.main()`` from ``python recipes/<name>.py``: the classes get their importable path
    (``recipes.<name>.Class``, what checkpoints and saved configs record), not ``__main__``."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import importlib

    importlib.import_module(module_name).main()
