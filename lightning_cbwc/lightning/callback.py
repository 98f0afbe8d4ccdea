"""CBWC: the Lightning callback, a thin layer over :func:`~lightning_cbwc.convert` and
:func:`~lightning_cbwc.attach`.

    trainer = L.Trainer(callbacks=[lightning_cbwc.CBWC(model_attr="model")])

Hooks (Lightning 2.6): ``setup`` converts (idempotent: every stage calls it), ``on_fit_start`` attaches to
each optimizer a step post-hook that re-centers the projected writers right after ``optimizer.step()``
(Lightning has no callback hook between the step and the next forward) and gradient hooks that center their
gradients as they accumulate (so clipping, manual optimization included, sees the LayerNorm model's), logging
steps measure how far from LayerNorm the swapped norms run, and ``on_fit_end`` exports.
docs/architecture.md has the why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..analysis.passes import REPLACE
from ..errors import CaptureError, CBWCError
from ..export.trained import export_trained
from ..training.conversion import convert
from ..training.lora import prepare_
from ..training.monitor import InputMeanMonitor, swapped_norms
from ..training.projection import OptimizerHooks, attach, max_writer_column_mean, projection_targets
from ..training.state import MODES, converted_modules
from . import inputs
from .inputs import default_batch_to_inputs

log = logging.getLogger("lightning_cbwc")

__all__ = ["CBWC", "default_batch_to_inputs"]


class CBWC(Callback):
    """Train a LayerNorm model as CBWC + RMSNorm: LayerNorm's function at RMSNorm's cost.

    Args:
        mode: ``"parametrize"`` (default: W = V - mean(V) over the LayerNorm model's weights, exact for every
            optimizer) or ``"project"`` (re-center after each step); README's table says what is exact where.
        replace: ``"foldable"`` (default: only the LayerNorms that keep the function exactly) or ``"all"``
            (training from scratch: every LayerNorm becomes RMSNorm, the ones that cannot be exact are marked
            approximate, and each one's input mean / RMS is logged as ``cbwc/input_mean_ratio/<site>``).
        example_inputs: inputs for the analysis (a tensor, a tuple of args, a dict of kwargs or an
            ``(args, kwargs)`` pair); default: ``example_input_array``, else the stage's first batch.
        example_kwargs: keyword inputs for the analysis.
        model_attr: dotted name of the submodule of the LightningModule to convert (e.g. ``"model"``);
            default: the LightningModule itself (its ``forward`` is captured).
        batch_to_inputs: callable turning a batch into model inputs (default :func:`default_batch_to_inputs`).
        check: compare the converted model's outputs with the original's at conversion.
        log_stats: log ``cbwc/max_column_mean`` and ``cbwc/max_input_mean_ratio`` (over the exact sites) every
            ``log_every_n_steps``.
        export_dir: if set, write the converted model there when fit ends (rank 0).
        export_formats: formats for :func:`lightning_cbwc.export.export` (``safetensors``, ``pt2``, ``onnx``).
    """

    def __init__(
        self,
        mode: Literal["project", "parametrize"] = "parametrize",
        replace: Literal["foldable", "all"] = "foldable",
        example_inputs: Any = None,
        example_kwargs: dict[str, Any] | None = None,
        model_attr: str | None = None,
        batch_to_inputs: Callable[[Any], Any] | None = None,
        check: bool = True,
        log_stats: bool = True,
        export_dir: str | None = None,
        export_formats: Sequence[str] = ("safetensors",),
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"CBWC: mode must be one of {MODES}, got {mode!r}")
        if replace not in REPLACE:
            raise ValueError(f"CBWC: replace must be one of {REPLACE}, got {replace!r}")
        self.mode = mode
        self.replace = replace
        self.example_inputs = example_inputs
        self.example_kwargs = example_kwargs
        self.model_attr = model_attr
        self.batch_to_inputs = batch_to_inputs or default_batch_to_inputs
        self.check = check
        self.log_stats = log_stats
        self.export_dir = export_dir
        self.export_formats = tuple(export_formats)
        self._example: tuple[tuple, dict] | None = None
        self._hooks: dict[int, OptimizerHooks] = {}
        self._monitor = InputMeanMonitor()
        self._reported = False

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        """The network to convert; a one-line CBWCError naming ``model_attr`` when there is none."""
        target = inputs.find_network(pl_module, self.model_attr)
        if target is not None:
            return target
        if self.model_attr:
            raise CBWCError(
                f"CBWC(model_attr={self.model_attr!r}): {type(pl_module).__name__} has no such submodule (also "
                "not after configure_model)"
            )
        raise CBWCError(
            f"CBWC: {type(pl_module).__name__} has no forward and no single child holding the LayerNorms: name "
            "the network with CBWC(model_attr=...), e.g. CBWC(model_attr='model')"
        )

    def _examples(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> tuple[tuple, dict]:
        target = self._target(pl_module)
        return inputs.example_inputs(
            trainer, pl_module, target, stage, self.example_inputs, self.example_kwargs, self.batch_to_inputs
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Convert now when the network exists and the precision plugin will not cast it later; otherwise
        (built in ``configure_model``, ``64-true`` / ``bf16-true``) at the start of the stage."""
        inputs.check_strategy(trainer.strategy)
        target = inputs.find_network(pl_module, self.model_attr)
        built = target is not None and inputs.holds_layer_norm(target)
        if built and not inputs.casts_module(trainer):
            self._convert(trainer, pl_module, stage)

    def _convert(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not converted_modules(pl_module):
            target = self._target(pl_module)
            self._example = args, kwargs = self._examples(trainer, pl_module, stage)
            try:
                convert(target, args, kwargs, mode=self.mode, replace=self.replace, check=self.check)
            except CaptureError as exc:
                raise CaptureError(
                    f"{exc} (CBWC callback, converting {self.model_attr or type(target).__name__}: name a "
                    "traceable submodule with CBWC(model_attr=...), or give the inputs it is called with via "
                    "example_inputs= / batch_to_inputs=)"
                ) from exc
        parametrized = any(state.parametrized for _, _, state in converted_modules(pl_module))
        inputs.check_order(trainer, self, parametrized)
        if not self._reported:
            self._reported = True
            self._report(trainer)

    def _report(self, trainer: pl.Trainer) -> None:
        convs = converted_modules(trainer.lightning_module)
        for name, _, state in convs:
            lines = [f"CBWC{f' [{name}]' if name else ''}: {state.summary()}"]
            lines += [f"  approximate {s.name}: {s.reason}" for s in state.plan.approximate]
            lines += [f"  kept LayerNorm {s.name}: {s.reason}" for s in state.plan.kept]
            if len(lines) > 12:
                lines = [*lines[:11], f"  ... and {len(lines) - 11} more (str(plan) lists them all)"]
            rank_zero_info("\n".join(lines))
        if not convs:
            return
        states = [s for _, _, s in convs]
        hp = {
            "cbwc/mode": states[0].mode,
            "cbwc/norms": sum(len(s.plan.sites) for s in states),
            "cbwc/folded": sum(len(s.plan.foldable) for s in states),
            "cbwc/approximate": sum(len(s.plan.approximate) for s in states),
            "cbwc/writers": sum(len(s.plan.writers) for s in states),
        }
        errors = [s.max_error for s in states if s.max_error is not None]
        if errors:
            hp["cbwc/conversion_error"] = max(errors)
        changes = [s.step0_change for s in states if s.step0_change is not None]
        if changes:  # replace="all": how far the conversion moved the model's outputs
            hp["cbwc/step0_change"] = max(changes)
        for logger in trainer.loggers:
            logger.log_hyperparams(hp)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._convert(trainer, pl_module, "validate")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._convert(trainer, pl_module, "test")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._convert(trainer, pl_module, "predict")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._convert(trainer, pl_module, "fit")
        prepare_(pl_module)  # LoRA layers added after the conversion (e.g. in configure_model)
        targets = projection_targets(pl_module)
        self._remove_hooks()
        for opt in trainer.optimizers:
            self._hooks[id(opt)] = attach(opt, pl_module, targets=targets)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.log_stats and inputs.logs_this_step(trainer) and not self._monitor.attached:
            self._monitor.attach(pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._monitor.attached:
            return
        ratios = self._monitor.detach()
        if not converted_modules(pl_module):
            return
        approximate = swapped_norms(pl_module, "approximate")
        exact = [r for name, r in ratios.items() if name not in approximate]
        pl_module.log("cbwc/max_column_mean", max_writer_column_mean(pl_module), on_step=True, on_epoch=False)
        pl_module.log("cbwc/max_input_mean_ratio", max(exact, default=0.0), on_step=True, on_epoch=False)
        for name in approximate:  # how far from LayerNorm each approximate site runs
            if name in ratios:
                pl_module.log(f"cbwc/input_mean_ratio/{name}", ratios[name], on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_dir and trainer.is_global_zero:
            example = self._example or self._examples(trainer, pl_module, "fit")
            export_trained(
                self._target(pl_module), self.export_dir, formats=self.export_formats, example=example
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._monitor.detach()

    def _remove_hooks(self) -> None:
        for hooks in self._hooks.values():
            hooks.remove()
        self._hooks = {}

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "replace": self.replace}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("mode", self.mode) != self.mode:
            log.warning(
                "CBWC: the checkpoint was trained with mode=%r, resuming with mode=%r (the weights carry "
                "over exactly; the optimizer state of parametrized writers refers to V)",
                state_dict.get("mode"),
                self.mode,
            )
        saved = state_dict.get("replace", "foldable")
        if saved != self.replace:
            raise CBWCError(
                f"CBWC: the checkpoint was trained with CBWC(replace={saved!r}) but this run uses "
                f"replace={self.replace!r}: the two train different models. Resume with CBWC(replace={saved!r})."
            )
