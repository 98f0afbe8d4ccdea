"""``lightning-cbwc run | reproduce | demo``: the training recipes of the repository's ``recipes/`` folder.

    lightning-cbwc run image_classification -c configs/image_classification_cbwc.yaml [--trainer.max_epochs 1 ...]
        == python recipes/image_classification.py fit -c configs/image_classification_cbwc.yaml ...
    lightning-cbwc run text_generation sample --ckpt runs/text_generation/ln/checkpoints/last.ckpt
    lightning-cbwc reproduce [--seeds 3 ...]      == python recipes/reproduce.py ...
    lightning-cbwc demo [...]                      == python -m recipes.demo ...

``run RECIPE`` passes everything after the recipe name to the recipe's LightningCLI; when that does not start
with a subcommand (fit, validate, test, predict, or the recipe's own, e.g. ``sample``) it runs ``fit``.

The recipes live in the source tree (``recipes/`` beside the ``lightning_cbwc`` package, or the folder named by
``$LIGHTNING_CBWC_RECIPES``), not in the installed package: they are programs to read and copy.  This module
is light to import; the recipes import Lightning when they run.

Hook into the main CLI: call :func:`dispatch` first in its ``main`` (the recipes parse their own options,
which an outer argparse would reject) and, for its help, :func:`add_commands`.  On its own:
``python -m lightning_cbwc.cli.recipes run ...``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: recipe -> extra subcommands it handles itself (besides LightningCLI's)
EXTRA_SUBCOMMANDS = {"text_generation": ("sample",)}
_NOT_RECIPES = {"__init__", "demo", "reproduce"}


class RecipesNotFoundError(FileNotFoundError):
    """No ``recipes/`` folder: the recipes ship with the source tree, not the wheel."""


def recipes_dir() -> Path:
    """The ``recipes`` package folder: ``$LIGHTNING_CBWC_RECIPES``, else ``recipes/`` beside this package."""
    env = os.environ.get("LIGHTNING_CBWC_RECIPES")
    folder = Path(env) if env else Path(__file__).resolve().parents[2] / "recipes"
    if not (folder / "__init__.py").is_file():
        raise RecipesNotFoundError(
            f"no recipes folder at {folder}: the recipes come with the lightning-cbwc source tree (git clone, "
            "then `pip install -e .`), or set LIGHTNING_CBWC_RECIPES to a copy of its recipes/ folder"
        )
    return folder


def list_recipes() -> list[str]:
    """The recipe names (``recipes/*.py`` with a ``main``, minus the package's helpers, demo and reproduce)."""
    return sorted(
        p.stem
        for p in recipes_dir().glob("*.py")
        if p.stem not in _NOT_RECIPES and not p.stem.startswith("_")
    )


def import_recipe(name: str):
    """Import ``recipes.<name>`` with the recipes' parent folder on ``sys.path``."""
    folder = recipes_dir()
    root = str(folder.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    loaded = sys.modules.get("recipes")
    if (
        loaded is not None
        and Path(getattr(loaded, "__file__", "") or "").resolve().parent != folder.resolve()
    ):
        raise RecipesNotFoundError(f"another `recipes` package is already imported: {loaded.__file__}")
    return importlib.import_module(f"recipes.{name}")


def recipe_args(recipe: str, args: Sequence[str]) -> list[str]:
    """``args`` with ``fit`` put in front unless they start with a subcommand (or ask for help)."""
    args = list(args)
    known = SUBCOMMANDS + EXTRA_SUBCOMMANDS.get(recipe, ())
    if args and (args[0] in known or args[0] in ("-h", "--help")):
        return args
    return ["fit", *args]


def run_recipe(recipe: str, args: Sequence[str]) -> int:
    """Run ``recipes/<recipe>.py`` in this process with ``args`` (see :func:`recipe_args`)."""
    names = list_recipes()
    if recipe not in names:
        print(f"error: unknown recipe {recipe!r}; choose one of: {', '.join(names)}", file=sys.stderr)
        return 2
    module = import_recipe(recipe)
    # through sys.argv, as from the command line: LightningCLI names the program after argv[0] and warns when
    # given both `args=` and a command line
    saved = sys.argv
    sys.argv = [f"lightning-cbwc run {recipe}", *recipe_args(recipe, args)]
    try:
        module.main()
    finally:
        sys.argv = saved
    return 0


COMMANDS = {
    "run": "run a training recipe: `run RECIPE [SUBCOMMAND] ARGS` is `python recipes/RECIPE.py fit ARGS`",
    "reproduce": "LN vs CBWC on every recipe, several seeds; writes docs/results.md (see `reproduce --help`)",
    "demo": "train a ViT with CBWC for one epoch on CPU, fold, export to ONNX, check and time it",
}


def dispatch(argv: Sequence[str]) -> int | None:
    """Run ``argv`` if it is a recipes command (``run``, ``reproduce``, ``demo``); None otherwise.

    Call it first in a CLI's ``main``: the recipes parse their own arguments (LightningCLI / argparse), which an
    outer argparse would reject as unknown options."""
    argv = list(argv)
    if not argv or argv[0] not in COMMANDS:
        return None
    command, rest = argv[0], argv[1:]
    try:
        if command == "run":
            if not rest or rest[0] in ("-h", "--help"):
                names = ", ".join(list_recipes())
                print(
                    f"usage: lightning-cbwc run RECIPE [SUBCOMMAND] [ARGS...]\n\n{COMMANDS['run']}.\n"
                    f"recipes: {names}\n`lightning-cbwc run RECIPE --help` shows a recipe's options."
                )
                return 0 if rest else 2
            return run_recipe(rest[0], rest[1:])
        module = import_recipe(command)
        return int(module.main(rest) or 0)
    except RecipesNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """List ``run``, ``reproduce`` and ``demo`` in an argparse CLI's help.  Their arguments are parsed by the
    recipes themselves: the CLI's ``main`` must hand such argv to :func:`dispatch` before its own parser."""
    for name, text in COMMANDS.items():
        p = subparsers.add_parser(name, help=text, description=text, add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda args, _name=name: dispatch([_name, *args.args]) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    code = dispatch(argv)
    if code is None:
        print(f"usage: python -m lightning_cbwc.cli.recipes {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        for name, text in COMMANDS.items():
            print(f"  {name:10s} {text}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
