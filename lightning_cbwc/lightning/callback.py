"""CBWC: the Lightning callback.  Thin: converts at setup, keeps the writers centered, logs, exports.

    trainer = L.Trainer(callbacks=[lightning_cbwc.CBWC()])           # or, in a LightningCLI YAML:
    #   trainer:
    #     callbacks:
    #       - class_path: lightning_cbwc.CBWC
    #         init_args: {mode: project, model_attr: model}

When things happen (Lightning 2.6):

* ``setup`` (every fit / validate / test / predict, before ``LightningModule.setup``, ``configure_model`` and
  ``configure_optimizers``): :func:`~lightning_cbwc.convert` the LightningModule, or the submodule named by
  ``model_attr``.  Idempotent (marker based): the second stage, a second ``fit``, or a model the user already
  converted in ``configure_model`` are left as they are.  Checkpoints are restored after ``setup``, into the
  converted model (state dicts keep plain keys, so ``ckpt_path`` resume and ``load_from_checkpoint`` work).
* ``on_fit_start`` (after ``configure_model``, ``configure_optimizers`` and the strategy wrapped the model): LoRA
  layers added after the conversion are prepared (:func:`lightning_cbwc.training.lora.prepare_`), and a step post-hook is
  registered on every optimizer that re-centers the writers right after ``optimizer.step()``.
* ``on_before_optimizer_step`` (after gradient accumulation, unscaling and the DDP all-reduce, before gradient
  clipping): the writers' gradients are centered, so Adam sees the LayerNorm model's gradient.

Why an optimizer step post-hook for the projection: Lightning 2.6 has no callback hook between
``optimizer.step()`` and the next forward.  ``on_before_zero_grad`` is wrong: in automatic optimization
Lightning zeroes the gradients *inside the closure of the next step, after its forward* (so that forward would
see unprojected weights), and with gradient accumulation only on the first micro-batch.  ``on_train_batch_end``
with a ``global_step`` guard is right once per step, but runs after other callbacks' ``on_train_batch_end``
(a ``WeightAveraging`` listed first would average unprojected weights) and misses manual optimization with
several steps per batch.  ``torch.optim.Optimizer.register_step_post_hook`` runs exactly once per real step
(never for a step a GradScaler skips), for automatic and manual optimization and with gradient accumulation.

Example inputs for the analysis, first found of: the ``example_inputs`` (and ``example_kwargs``) argument;
``example_input_array`` of the converted submodule or of the LightningModule (Lightning's convention: a tuple
is ``*args``, a dict is ``**kwargs``); the first batch of the stage's dataloader (train for fit, val for
validate, ...), turned into model inputs by ``batch_to_inputs``.  The default ``batch_to_inputs`` takes a
tensor batch as is, ``batch[0]`` of a tuple/list batch, and the ``input_ids`` or ``pixel_values`` entry of a
dict batch; a custom one may return a tensor, a tuple of args, a dict of kwargs or an ``(args, kwargs)`` pair.
Hugging Face models (a ``config.use_cache`` attribute) are analyzed with ``use_cache=False``.  Converting the
whole LightningModule (the default) captures ``LightningModule.forward``: it must exist and be traceable; name
the network with ``model_attr`` otherwise.

Mode: ``"project"`` is the default.  Both modes convert the same way and both train exactly like the
LayerNorm model; they differ in cost.  ``benchmarks/bench_training.py`` (this machine's CPU, 1 thread, CPU-time
clock, interleaved): the projection (gradient + weight centering of every writer) costs 0.39% of a ViT-S/16
training step (224px, batch 8, 12.9 ms) and 0.68% of a GPT-2 small step (4 x 128 tokens, 47 ms), once per
optimizer step whatever the accumulation; parametrize recomputes the centering in every forward and backward
and measured +1.2 to +2.2% (ViT-S) and +5.9 to +6.1% (GPT-2) over the plain RMSNorm swap, against -0.3 to
+1.5% and +2.6 to +3.8% for project (whole-step differences, +-3% noise).  Parametrize also renames parameters
(``parametrizations.weight.original``), which code walking ``named_parameters()`` may not expect.

Visibility: at setup the plan summary (how many LayerNorms fold, which do not and why) is logged on rank 0 and
sent to the loggers as hyperparameters (``cbwc/*``).  Every ``log_every_n_steps`` the callback logs
``cbwc/max_column_mean`` (largest relative |column mean| over writers: ~1e-7 in float32) and
``cbwc/max_input_mean_ratio`` (largest |mean| / RMS of a folded norm's input on that batch: LayerNorm
equivalence needs it ~0), measured by forward pre-hooks that exist only during logging steps.

Unsupported, raised at setup: FSDP (1 and 2), DeepSpeed and ModelParallel strategies (their sharded / flat
parameters make the per-column projection wrong); DoRA and base-modifying LoRA inits.  ``WeightAveraging`` /
``EMAWeightAveraging``: any order in ``mode="project"``; in ``mode="parametrize"`` CBWC must come first (the
averaged copy is made at its setup and is paired with the model parameter by parameter).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..errors import CaptureError, CBWCError, UnsupportedError
from ..export.trained import export_trained
from ..norm import RMSNorm2d
from ..training.conversion import convert
from ..training.projection import (
    Target,
    max_writer_column_mean,
    project_,
    project_grads_,
    projection_targets,
)
from ..training.state import converted_modules

log = logging.getLogger("lightning_cbwc")

_LOOPS = {"fit": "fit_loop", "validate": "validate_loop", "test": "test_loop", "predict": "predict_loop"}


def default_batch_to_inputs(batch: Any) -> tuple:
    """A batch -> positional model inputs: the tensor itself, ``batch[0]`` of a tuple / list, or the
    ``input_ids`` / ``pixel_values`` entry of a dict."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, Mapping):
        for key in ("input_ids", "pixel_values"):
            if key in batch:
                return (batch[key],)
        raise CBWCError(
            f"CBWC: cannot tell the model input in a dict batch with keys {sorted(batch)}: pass "
            "CBWC(batch_to_inputs=...) or CBWC(example_inputs=...)"
        )
    if isinstance(batch, list | tuple) and batch:
        return (batch[0],)
    raise CBWCError(
        f"CBWC: cannot turn a {type(batch).__name__} batch into model inputs: pass batch_to_inputs=..."
    )


def _split(inputs: Any) -> tuple[tuple, dict]:
    """What a batch_to_inputs / example_input_array gives -> (args, kwargs)."""
    if (
        isinstance(inputs, tuple)
        and len(inputs) == 2
        and isinstance(inputs[0], tuple)
        and isinstance(inputs[1], dict)
    ):
        return inputs[0], dict(inputs[1])
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, tuple):
        return inputs, {}
    if isinstance(inputs, list):
        return tuple(inputs), {}
    return (inputs,), {}


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def _check_strategy(strategy: Any) -> None:
    names = {cls.__name__ for cls in type(strategy).__mro__}
    if names & {"FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy"}:
        kind = (names & {"FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy"}).pop()
        why = {
            "FSDPStrategy": "FSDP flattens and shards parameters, so a column of a writer is not a column of its "
            "flat parameter",
            "ModelParallelStrategy": "FSDP2 / tensor parallel shard parameters as DTensors, and CBWC does not "
            "project sharded writers yet",
            "DeepSpeedStrategy": "DeepSpeed (ZeRO) partitions and owns the parameters and the optimizer step",
        }[kind]
        raise UnsupportedError(
            f"CBWC does not support the {kind}: {why}. Use strategy='ddp' (or 'ddp_spawn'), or fold the trained "
            "LayerNorm model for inference with lightning_cbwc.fold()."
        )


class CBWC(Callback):
    """Train a LayerNorm model as CBWC + RMSNorm (LayerNorm's function at RMSNorm's cost); see the module doc.

    Args:
        mode: ``"project"`` (default: re-center after each optimizer step) or ``"parametrize"``.
        example_inputs: positional inputs for the analysis (a tensor or a tuple); default: see the module doc.
        example_kwargs: keyword inputs for the analysis.
        model_attr: dotted name of the submodule of the LightningModule to convert (e.g. ``"model"``);
            default: the LightningModule itself (its ``forward`` is captured).
        batch_to_inputs: callable turning a batch into model inputs (default :func:`default_batch_to_inputs`);
            in a YAML config, give its import path.
        check: compare the converted model's outputs with the original's at conversion.
        log_stats: log ``cbwc/max_column_mean`` and ``cbwc/max_input_mean_ratio`` every ``log_every_n_steps``.
        export_dir: if set, write the converted model there when fit ends (rank 0), with the plan as JSON.
        export_formats: formats to write to ``export_dir`` (``"safetensors"``; others go to
            ``lightning_cbwc.export.export`` when that module exists).
    """

    def __init__(
        self,
        mode: Literal["project", "parametrize"] = "project",
        example_inputs: Any = None,
        example_kwargs: dict[str, Any] | None = None,
        model_attr: str | None = None,
        batch_to_inputs: Callable[[Any], Any] | None = None,
        check: bool = True,
        log_stats: bool = True,
        export_dir: str | None = None,
        export_formats: Sequence[str] = ("safetensors",),
    ) -> None:
        if mode not in ("project", "parametrize"):
            raise ValueError(f"CBWC: mode must be 'project' or 'parametrize', got {mode!r}")
        self.mode = mode
        self.example_inputs = example_inputs
        self.example_kwargs = example_kwargs
        self.model_attr = model_attr
        self.batch_to_inputs = batch_to_inputs or default_batch_to_inputs
        self.check = check
        self.log_stats = log_stats
        self.export_dir = export_dir
        self.export_formats = tuple(export_formats)
        self._example: tuple[tuple, dict] | None = None
        self._targets: list[Target] = []
        self._per_opt: dict[int, list[Target]] = {}
        self._opt_hooks: list = []
        self._stat_hooks: list = []
        self._ratio = 0.0
        self._log_now = False
        self._reported = False

    # ------------------------------------------------------------------ setup: convert
    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        if not self.model_attr:
            return pl_module
        try:
            return pl_module.get_submodule(self.model_attr)
        except AttributeError as exc:
            raise CBWCError(
                f"CBWC(model_attr={self.model_attr!r}): {type(pl_module).__name__} has no such submodule"
            ) from exc

    def _check_order(self, trainer: pl.Trainer) -> None:
        try:
            from lightning.pytorch.callbacks import WeightAveraging
        except ImportError:  # pragma: no cover - Lightning < 2.6
            return
        callbacks = list(trainer.callbacks)
        mine = callbacks.index(self) if self in callbacks else len(callbacks)
        early = [c for c in callbacks[:mine] if isinstance(c, WeightAveraging)]
        if early and self.mode == "parametrize":
            raise CBWCError(
                f"CBWC(mode='parametrize') must come before {type(early[0]).__name__} in Trainer(callbacks=[...]): "
                "the averaged copy is made at its setup and paired with the model parameter by parameter, and "
                "the parametrization renames and reorders parameters. Put CBWC first (or use mode='project', "
                "which works in either order)."
            )

    def _first_batch(self, trainer: pl.Trainer, stage: str) -> Any:
        loop = getattr(trainer, _LOOPS.get(stage, "fit_loop"), None)
        source = getattr(loop, "_data_source", None)
        if source is None or getattr(source, "instance", None) is None or not source.is_defined():
            raise CBWCError(
                "CBWC needs example inputs to analyze the model: pass CBWC(example_inputs=...), set "
                "LightningModule.example_input_array, or give the trainer a dataloader / datamodule"
            )
        loaders = source.dataloader()
        if isinstance(loaders, Mapping):
            loaders = next(iter(loaders.values()))
        elif isinstance(loaders, list | tuple):
            loaders = loaders[0]
        return next(iter(loaders))

    def _examples(self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: nn.Module, stage: str):
        if self.example_inputs is not None:
            args, kwargs = _split(self.example_inputs)
            kwargs.update(self.example_kwargs or {})
        else:
            arr = getattr(target, "example_input_array", None)
            if arr is None:
                arr = getattr(pl_module, "example_input_array", None)
            if arr is None:
                arr = self.batch_to_inputs(self._first_batch(trainer, stage))
            args, kwargs = _split(arr)
            kwargs.update(self.example_kwargs or {})
        config = getattr(target, "config", None)
        if (
            config is not None
            and getattr(config, "use_cache", None) is not None
            and _accepts(target, "use_cache")
        ):
            kwargs.setdefault("use_cache", False)
        device = next((p.device for p in target.parameters()), torch.device("cpu"))
        return move_data_to_device(args, device), move_data_to_device(kwargs, device)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _check_strategy(trainer.strategy)
        self._check_order(trainer)
        target = self._target(pl_module)
        if not converted_modules(pl_module):
            args, kwargs = self._examples(trainer, pl_module, target, stage)
            self._example = (args, kwargs)
            try:
                convert(target, args, kwargs, mode=self.mode, check=self.check)
            except CaptureError as exc:
                raise CaptureError(
                    f"{exc} (CBWC callback, converting {self.model_attr or type(pl_module).__name__}: name a "
                    "traceable submodule with CBWC(model_attr=...), or give the inputs it is called with via "
                    "example_inputs= / batch_to_inputs=)"
                ) from exc
        self._report(trainer)

    def _report(self, trainer: pl.Trainer) -> None:
        if self._reported:
            return
        self._reported = True
        convs = converted_modules(trainer.lightning_module)
        if not convs:
            return
        for name, _, state in convs:
            plan = state.plan
            lines = [f"CBWC{f' [{name}]' if name else ''}: {state.summary()}"]
            for site in plan.not_foldable:
                lines.append(f"  kept LayerNorm {site.name}: {site.reason}")
            if len(lines) > 12:
                lines = [*lines[:11], f"  ... and {len(lines) - 11} more kept"]
            rank_zero_info("\n".join(lines))
        hp = {
            "cbwc/mode": convs[0][2].mode,
            "cbwc/norms": sum(len(s.plan.sites) for _, _, s in convs),
            "cbwc/folded": sum(len(s.plan.foldable) for _, _, s in convs),
            "cbwc/writers": sum(len(s.plan.writers) for _, _, s in convs),
        }
        errs = [s.max_error for _, _, s in convs if s.max_error is not None]
        if errs:
            hp["cbwc/conversion_error"] = max(errs)
        for logger in trainer.loggers:
            logger.log_hyperparams(hp)

    # ------------------------------------------------------------------ training: keep the writers centered
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from ..training.lora import prepare_

        prepare_(pl_module)
        self._targets = projection_targets(pl_module)
        self._per_opt = {}
        self._remove_opt_hooks()
        for opt in trainer.optimizers:
            mine = self._mine(opt)
            if mine:
                self._opt_hooks.append(opt.register_step_post_hook(_ProjectAfterStep(mine)))

    def _mine(self, optimizer: torch.optim.Optimizer) -> list[Target]:
        """The targets ``optimizer`` updates (cached per optimizer)."""
        key = id(optimizer)
        if key not in self._per_opt:
            ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
            self._per_opt[key] = [t for t in self._targets if id(t.tensor) in ids]
        return self._per_opt[key]

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        project_grads_(self._mine(optimizer))

    def _remove_opt_hooks(self) -> None:
        for h in self._opt_hooks:
            h.remove()
        self._opt_hooks = []

    # ------------------------------------------------------------------ visibility
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.log_stats:
            return
        try:
            self._log_now = bool(trainer._logger_connector.should_update_logs)
        except AttributeError:  # pragma: no cover - other Lightning versions
            self._log_now = (trainer.global_step + 1) % max(trainer.log_every_n_steps, 1) == 0
        if self._log_now and not self._stat_hooks:
            self._ratio = 0.0
            for _, mod, state in converted_modules(pl_module):
                for name in state.norms:
                    norm = mod.get_submodule(name)
                    self._stat_hooks.append(norm.register_forward_pre_hook(self._input_ratio_hook))

    def _input_ratio_hook(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        if isinstance(module, RMSNorm2d):
            x = x.movedim(1, -1)
        dims = tuple(range(-len(module.normalized_shape), 0))
        x = x.float()
        ratio = (x.mean(dim=dims).abs() / x.pow(2).mean(dim=dims).sqrt().clamp_min(1e-30)).max()
        self._ratio = max(self._ratio, float(ratio))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._log_now:
            return
        self._log_now = False
        for h in self._stat_hooks:
            h.remove()
        self._stat_hooks = []
        if converted_modules(pl_module):
            pl_module.log(
                "cbwc/max_column_mean", max_writer_column_mean(pl_module), on_step=True, on_epoch=False
            )
            pl_module.log("cbwc/max_input_mean_ratio", self._ratio, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ end
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_dir and trainer.is_global_zero:
            target = self._target(pl_module)
            args, kwargs = self._example or self._examples(trainer, pl_module, target, "fit")
            export_trained(target, self.export_dir, formats=self.export_formats, example=(args, kwargs))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_opt_hooks()
        self._per_opt = {}
        for h in self._stat_hooks:
            h.remove()
        self._stat_hooks = []

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("mode", self.mode) != self.mode:
            log.warning(
                "CBWC: the checkpoint was trained with mode=%r, resuming with mode=%r (the weights carry "
                "over exactly; the optimizer state of parametrized writers refers to V)",
                state_dict.get("mode"),
                self.mode,
            )


class _ProjectAfterStep:
    """Optimizer step post-hook: re-center the writers this optimizer updates."""

    def __init__(self, targets: list[Target]) -> None:
        self.targets = targets

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        project_(self.targets)
