"""The recipes' LightningCLI (:class:`RecipeCLI`) and the script entry point (:func:`script_main`)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from recipes._callbacks import RUN_DIR, ExportFolded, RunSummary

REPO = Path(__file__).resolve().parents[1]

__all__ = ["RUN_DIR", "RecipeCLI", "default_loggers", "script_main"]


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

    The ``summary`` section configures :class:`~recipes._callbacks.RunSummary`, ``export``
    :class:`~recipes._callbacks.ExportFolded`, ``checkpoint`` Lightning's ModelCheckpoint.
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
    importlib.import_module(module_name).main()
