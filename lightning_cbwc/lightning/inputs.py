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
from lightning.pytorch.plugins.precision import Precision
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import CBWCError, UnsupportedError
from ..inputs import split_inputs

_LOOPS = {"fit": "fit_loop", "validate": "validate_loop", "test": "test_loop", "predict": "predict_loop"}

#: strategy class -> why CBWC refuses it
UNSUPPORTED_STRATEGIES = {
    "FSDPStrategy": "FSDP flattens and shards parameters, so a column of a writer is not a column of its "
    "flat parameter",
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


def unwrapped(module: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` (``_orig_mod``) and peft (``get_base_model()``) wrappers."""
    for _ in range(8):
        inner = module.__dict__.get("_modules", {}).get("_orig_mod")
        if inner is None and callable(getattr(type(module), "get_base_model", None)):
            inner = module.get_base_model()
        if not isinstance(inner, nn.Module) or inner is module:
            return module
        module = inner
    return module


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _cast_floats(tree: Any, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return tree
    return pytree.tree_map(
        lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, tree
    )


def holds_layer_norm(module: nn.Module) -> bool:
    """True when ``module`` or a module under it is an ``nn.LayerNorm``."""
    return any(isinstance(m, nn.LayerNorm) for m in module.modules())


def find_network(pl_module: pl.LightningModule, model_attr: str | None) -> nn.Module | None:
    """The module the callback converts, or None when it does not exist yet (built in ``configure_model``):
    ``model_attr`` when given; else the LightningModule when it defines ``forward``; else its single child
    holding LayerNorms."""
    if model_attr:
        try:
            return pl_module.get_submodule(model_attr)
        except AttributeError:
            return None
    if type(pl_module).forward is not pl.LightningModule.forward:
        return pl_module
    holders = [c for c in pl_module.children() if holds_layer_norm(c)]
    return holders[0] if len(holders) == 1 else None


def casts_module(trainer: pl.Trainer) -> bool:
    """True when the precision plugin casts the model's parameters in the strategy's setup (``64-true``,
    ``bf16-true``...): the callback then converts after that cast, not before."""
    plugin = trainer.strategy.precision_plugin
    return type(plugin).convert_module is not Precision.convert_module


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
    inner = unwrapped(target)
    config = getattr(inner, "config", None)
    if getattr(config, "use_cache", None) is not None and _accepts(inner, "use_cache"):
        kw.setdefault("use_cache", False)
    params = [p for p in target.parameters() if p.is_floating_point()]
    device = params[0].device if params else torch.device("cpu")
    dtype = params[0].dtype if params and casts_module(trainer) else None  # inputs as the plugin casts them
    return _cast_floats(move_data_to_device(args, device), dtype), _cast_floats(
        move_data_to_device(kw, device), dtype
    )


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
