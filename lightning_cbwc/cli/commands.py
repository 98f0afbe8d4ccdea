"""``lightning-cbwc``: inspect which LayerNorms of a model fold into RMSNorm, and fold them.

Exit codes: 0 success; 1 the folded model failed its check against the original; 2 a user error (bad spec,
missing file, unknown model, checkpoint mismatch, a model that cannot be captured or folded); 3 an unexpected
internal error.  Errors print one line starting with ``error:`` on stderr; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CBWCError, FoldCheckError, FoldingError
from ..specs import SPEC_FORMS, LoadedModel, load

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USER_ERROR, EXIT_INTERNAL = 0, 1, 2, 3
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
_MAX_ERROR_CHARS = 600
_WRITERS_SHOWN = 3
_KEPT_SHOWN = 5


class _CheckFailed(Exception):
    """The fold ran but the folded model does not reproduce the original."""


# ------------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show tracebacks and library logs",
    )
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("spec", metavar="SPEC", help=f"the model: {SPEC_FORMS}")
    model.add_argument("--arch", metavar="SPEC", help="the architecture of a checkpoint file SPEC")
    model.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="SHAPE",
        help="an example input instead of the one read from the model's config: 2,3,224,224 (float) or "
        "int:2,16 (token ids; int1000:2,16 gives the vocabulary); repeat for several positional inputs",
    )
    model.add_argument("--seed", type=int, default=0, help="seed of the example inputs (default 0)")

    parser = argparse.ArgumentParser(
        prog="lightning-cbwc",
        description="Find the LayerNorms of a PyTorch model that fold into RMSNorm by column-centering the "
        "linear layers that write into them (CBWC), and fold them.",
        epilog="exit codes: 0 ok, 1 folded model failed its check, 2 user error, 3 internal error",
    )
    parser.add_argument(
        "--verbose", "-v", action="store_true", default=False, help="show tracebacks and library logs"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_model_commands(sub, [common, model])
    from . import recipes as recipes_cli

    recipes_cli.add_commands(sub)
    return parser


def _add_model_commands(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """The inspect, fold and export subcommands (each takes a model spec)."""
    p = sub.add_parser(
        "inspect", parents=parents, help="print which LayerNorms fold and why the others don't"
    )
    p.add_argument(
        "--json", metavar="PATH", help="also write the plan as JSON to PATH ('-': print only the JSON)"
    )
    p.add_argument(
        "--picture", metavar="PATH", help="draw the plan to PATH (.svg/.png with graphviz, else .dot)"
    )
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "fold", parents=parents, help="fold, check against the original, write DIR/model.safetensors"
    )
    p.add_argument("--out", metavar="DIR", required=True, help="folder for model.safetensors and cbwc.json")
    p.add_argument(
        "--fuse-affine",
        action="store_true",
        help="also fuse each norm's gamma/beta into the linears it feeds",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(_DTYPES),
        default="float32",
        help="dtype of the saved weights (default float32); the fold is checked in float32 (float64 if asked)",
    )
    p.set_defaults(func=cmd_fold)

    p = sub.add_parser(
        "export",
        parents=parents,
        help="fold, then export to onnx | pt2 | safetensors and check the artefact against PyTorch",
    )
    p.add_argument("--format", choices=["onnx", "pt2", "safetensors"], required=True, help="what to write")
    p.add_argument(
        "--out", metavar="DIR", required=True, help="folder for the artefact and cbwc.json (plan, check)"
    )
    p.add_argument(
        "--fuse-affine",
        action="store_true",
        help="fuse each norm's gamma/beta into the linears it feeds (ONNX: no Add after each RMSNormalization)",
    )
    p.add_argument("--static", action="store_true", help="no dynamic batch / sequence dims (pt2, onnx)")
    p.add_argument("--opset", type=int, default=23, help="ONNX opset (default 23: RMSNormalization)")
    p.set_defaults(func=cmd_export)


# --------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Silence library chatter (transformers' logs and progress bars, Python warnings) unless verbose."""
    if verbose:
        yield
        return
    saved_env = os.environ.get("TRANSFORMERS_VERBOSITY")
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"  # read when transformers is first imported
    hub = None
    with contextlib.suppress(ImportError):
        from huggingface_hub import utils as hub  # transformers reads the hub's switch when imported

        hub_bars = not hub.are_progress_bars_disabled()
        hub.disable_progress_bars()
    hf_logging, level = None, None
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
    try:
        if hf_logging is not None:
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if saved_env is None:
            os.environ.pop("TRANSFORMERS_VERBOSITY", None)
        else:
            os.environ["TRANSFORMERS_VERBOSITY"] = saved_env
        if hub is not None and hub_bars:
            hub.enable_progress_bars()
            if "transformers.utils.logging" in sys.modules:
                sys.modules["transformers.utils.logging"].enable_progress_bar()
        if hf_logging is not None and level is not None:
            hf_logging.set_verbosity(level)


def _console(file: Any = None) -> Any:
    from rich.console import Console

    return Console(file=file or sys.stdout, highlight=False, soft_wrap=True)


def _one_line(err: BaseException) -> str:
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    if len(text) > _MAX_ERROR_CHARS:
        text = text[: _MAX_ERROR_CHARS - 40].rstrip() + " ... (--verbose shows all)"
    return text


def _writers_text(site: Any) -> str:
    """The writers of a foldable site, grouped by the module (or parameter) that writes."""
    writers = list(site.writers)
    if not writers:
        return ""
    sources = list(dict.fromkeys(w.module or w.param for w in writers))
    shown = ", ".join(sources[:_WRITERS_SHOWN])
    more = f", +{len(sources) - _WRITERS_SHOWN} more" if len(sources) > _WRITERS_SHOWN else ""
    return f"{len(sources)} writer{'s' if len(sources) != 1 else ''}: {shown}{more}"


def plan_table(plan: Any, title: str | None = None) -> Any:
    """A rich table of the plan: one row per normalization."""
    from rich.table import Table

    table = Table(title=title, show_lines=False, header_style="bold")
    table.add_column("site", overflow="fold")
    table.add_column("type")
    table.add_column("foldable")
    table.add_column("reason / writers", overflow="fold")
    for s in plan.sites:
        verdict = "[green]yes[/green]" if s.foldable else "[red]no[/red]"
        detail = _writers_text(s) if s.foldable else (s.reason or "")
        table.add_row(s.name, s.module_type or s.kind, verdict, detail)
    return table


def _load(args: argparse.Namespace) -> LoadedModel:
    return load(args.spec, arch=args.arch, input_shapes=args.input_shape, seed=args.seed)


def _to_dtype(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple | list):
        return type(value)(_to_dtype(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _to_dtype(v, dtype) for k, v in value.items()}
    return value


# -------------------------------------------------------------------------------------------- commands


def cmd_inspect(args: argparse.Namespace) -> int:
    loaded = _load(args)  # spec errors first, before the analysis is imported
    from ..analysis import analyze

    plan = analyze(loaded.model, loaded.example_inputs, loaded.example_kwargs or None)
    if args.json == "-":
        print(plan.to_json())
        return EXIT_OK
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(plan.to_json() + "\n")
    console = _console()
    if plan.sites:
        console.print(plan_table(plan, title=f"{args.spec}: normalizations"))
        console.print(plan.summary())
    else:
        console.print(f"{args.spec}: nothing to fold (the model runs no LayerNorm)")
    if args.picture:
        written = plan.save_picture(args.picture)
        console.print(f"wrote {written or args.picture}")
    if args.json:
        console.print(f"wrote {args.json}")
    return EXIT_OK


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lightning-cbwc")
    except PackageNotFoundError:
        return "unknown"


def _is_check_failure(err: FoldingError) -> bool:
    return isinstance(err, FoldCheckError)


def cmd_fold(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CBWCError(f"--out {args.out} is a file; give a folder for model.safetensors and cbwc.json")
    loaded = _load(args)
    from ..export import describe_architecture, save_safetensors, update_sidecar
    from ..folding import fold

    model, inputs, kwargs = loaded.model, loaded.example_inputs, loaded.example_kwargs
    check_dtype = torch.float64 if args.dtype == "float64" else torch.float32
    model = model.to(check_dtype)
    inputs, kwargs = _to_dtype(inputs, check_dtype), _to_dtype(kwargs, check_dtype)
    try:
        folded = fold(model, inputs, kwargs or None, fuse_affine=args.fuse_affine, check=True)
    except FoldingError as e:
        if _is_check_failure(e):
            raise _CheckFailed(str(e)) from e
        raise
    plan = folded.cbwc_plan
    max_error = float(folded.cbwc_max_error)
    folded = folded.to(_DTYPES[args.dtype])

    out.mkdir(parents=True, exist_ok=True)
    metadata = {
        "producer": f"lightning-cbwc {_version()}",
        "spec": args.spec if not args.arch else f"{args.spec} (--arch {args.arch})",
        "dtype": args.dtype,
        "fuse_affine": json.dumps(bool(args.fuse_affine)),
        "max_error": repr(max_error),
    }
    save_safetensors(folded, out / "model.safetensors", metadata)
    architecture = describe_architecture(folded, args.arch or args.spec)
    sidecar = update_sidecar(out, plan=plan.to_dict(), architecture=architecture)

    console = _console()
    if not plan.sites:
        console.print(f"{args.spec}: nothing to fold (the model runs no LayerNorm); saved it unchanged")
    else:
        console.print(f"{args.spec}: {plan.summary()}")
        kept = plan.not_foldable
        for s in kept[:_KEPT_SHOWN]:
            console.print(f"  kept {s.name}: {s.reason or 'not foldable'}")
        if len(kept) > _KEPT_SHOWN:
            console.print(f"  kept {len(kept) - _KEPT_SHOWN} more LayerNorms: see {sidecar}")
    console.print(
        f"max error {max_error:.3g} (max |folded - original| / RMS(original) on the example inputs, "
        f"{str(check_dtype).removeprefix('torch.')})"
    )
    console.print(f"wrote {out / 'model.safetensors'} ({args.dtype}) and {sidecar}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CBWCError(f"--out {args.out} is a file; give a folder for the {args.format} artefact")
    loaded = _load(args)
    from ..export import ExportError, export
    from ..folding import fold

    try:
        folded = fold(
            loaded.model, loaded.example_inputs, loaded.example_kwargs or None, fuse_affine=args.fuse_affine
        )
    except FoldingError as e:
        if _is_check_failure(e):
            raise _CheckFailed(str(e)) from e
        raise
    try:
        result = export(
            folded,
            out,
            args.format,
            loaded.example_inputs,
            loaded.example_kwargs or None,
            dynamic=not args.static,
            opset=args.opset,
            architecture=args.arch or args.spec,
        )
    except ExportError as e:
        if e.max_error is not None:
            raise _CheckFailed(str(e)) from e
        raise
    console = _console()
    console.print(f"{args.spec}: {folded.cbwc_plan.summary()}")
    dims = ", ".join(f"{k}: {v}" for k, v in result.dynamic_dims.items()) or "none"
    console.print(
        f"{args.format}: max error {result.max_error:.3g} (max |artefact - folded| / RMS on fresh inputs "
        f"{result.check_shapes}; tolerance {result.tolerance:.3g}); dynamic dims: {dims}"
    )
    for note in result.notes:
        console.print(f"  note: {note}")
    console.print("wrote " + ", ".join(str(f) for f in result.files))
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    from . import recipes as recipes_cli

    # the recipes (run / reproduce / demo) parse their own arguments, which this parser would reject
    code = recipes_cli.dispatch(list(sys.argv[1:] if argv is None else argv))
    if code is not None:
        return code
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    try:
        with _quiet(verbose):
            return int(args.func(args))
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line on stderr, the traceback only with --verbose
        failure: Exception = e
    if isinstance(failure, _CheckFailed):
        code, msg = (
            EXIT_CHECK_FAILED,
            f"the folded model does not reproduce the original: {_one_line(failure)}",
        )
    elif isinstance(failure, CBWCError):
        code, msg = EXIT_USER_ERROR, _one_line(failure)
    else:  # a bug
        code, msg = (
            EXIT_INTERNAL,
            (
                f"internal error: {type(failure).__name__}: {_one_line(failure)} "
                "(rerun with --verbose for the traceback, and please report it)"
            ),
        )
    if verbose:
        traceback.print_exception(failure)
    print(f"error: {msg}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
