"""What the callback needs from the Trainer: example inputs, the strategy, the logging cadence.

The only module that reads Lightning's trainer beyond its documented attributes (``loop._data_source``, for
the first batch of the stage's dataloader before any loop ran).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback, WeightAveraging
from torch import nn

from ..errors import CBWCError, UnsupportedError
from ..inputs import split_inputs

_LOOPS = {"fit": "fit_loop", "validate": "validate_loop", "test": "test_loop", "predict": "predict_loop"}

#: strategy class -> why CBWC refuses it
UNSUPPORTED_STRATEGIES = {
    "FSDPStrategy": "FSDP flattens and shards parameters, so a column of a writer is not a column of its "
    "flat parameter",
    "ModelParallelStrategy": "FSDP2 / tensor parallel shard parameters as DTensors, and CBWC does not "
    "project sharded writers yet",
    "DeepSpeedStrategy": "DeepSpeed (ZeRO) partitions and owns the parameters and the optimizer step",
}


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


def first_batch(trainer: pl.Trainer, stage: str) -> Any:
    """The first batch of the stage's dataloader (train for fit, val for validate, ...)."""
    loop = getattr(trainer, _LOOPS.get(stage, "fit_loop"))
    source = loop._data_source
    if source.instance is None or not source.is_defined():
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


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def example_inputs(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    target: nn.Module,
    stage: str,
    inputs: Any = None,
    kwargs: dict[str, Any] | None = None,
    batch_to_inputs: Callable[[Any], Any] = default_batch_to_inputs,
) -> tuple[tuple, dict]:
    """``(args, kwargs)`` to analyze ``target`` with, on its device: ``inputs`` (+ ``kwargs``) when given, else
    ``example_input_array`` of ``target`` or of the LightningModule, else the first batch through
    ``batch_to_inputs``.  Hugging Face models (a ``config.use_cache``) get ``use_cache=False``."""
    if inputs is None:
        inputs = getattr(target, "example_input_array", None)
    if inputs is None:
        inputs = pl_module.example_input_array
    if inputs is None:
        inputs = batch_to_inputs(first_batch(trainer, stage))
    args, kw = split_inputs(inputs, kwargs)
    config = getattr(target, "config", None)
    if getattr(config, "use_cache", None) is not None and _accepts(target, "use_cache"):
        kw.setdefault("use_cache", False)
    device = next((p.device for p in target.parameters()), torch.device("cpu"))
    return move_data_to_device(args, device), move_data_to_device(kw, device)


def check_strategy(strategy: Any) -> None:
    """Raise UnsupportedError for strategies whose parameter layout breaks the per-column projection."""
    names = {cls.__name__ for cls in type(strategy).__mro__} & set(UNSUPPORTED_STRATEGIES)
    if names:
        kind = names.pop()
        raise UnsupportedError(
            f"CBWC does not support the {kind}: {UNSUPPORTED_STRATEGIES[kind]}. Use strategy='ddp' (or "
            "'ddp_spawn'), or fold the trained LayerNorm model for inference with lightning_cbwc.fold()."
        )


def check_order(trainer: pl.Trainer, callback: Callback, parametrized: bool) -> None:
    """With parametrized writers (mode='parametrize', or LayerScales), CBWC must come before any
    WeightAveraging callback (it pairs parameters)."""
    callbacks = list(trainer.callbacks)
    mine = callbacks.index(callback) if callback in callbacks else len(callbacks)
    early = [c for c in callbacks[:mine] if isinstance(c, WeightAveraging)]
    if early and parametrized:
        raise CBWCError(
            f"CBWC must come before {type(early[0]).__name__} in Trainer(callbacks=[...]) when it parametrizes "
            "writers (mode='parametrize', or writers followed by a LayerScale): the averaged copy is made at "
            "its setup and paired with the model parameter by parameter, and the parametrization renames and "
            "reorders parameters. Put CBWC first."
        )


def logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning logs the coming training step (``log_every_n_steps``, fast_dev_run, a stop)."""
    return bool(trainer._logger_connector.should_update_logs or trainer.fast_dev_run)
