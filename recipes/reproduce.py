"""Reproduce the comparison: LayerNorm vs plain RMSNorm vs CBWC + RMSNorm (exact, and ``replace="all"``) on
every recipe, several seeds, at a budget that runs on a 2-core CPU in about an hour; writes ``docs/results.md``
and training-curve plots.

    python recipes/reproduce.py                       # 3 seeds, budget "small" (the documented results)
    python recipes/reproduce.py --budget tiny --seeds 1 --tasks image_convnext --out /tmp/repro
    python recipes/reproduce.py --report-only         # rebuild docs/results.md from finished runs
    lightning-cbwc reproduce ...                       # the same

Every run is the recipe's own command (``python recipes/RECIPE.py fit -c configs/CONFIG.yaml`` plus the
budget's and the variant's overrides), in a subprocess, written under ``--out``; the exact commands are in the
results.  The variants (:mod:`recipes._tasks`): ``ln`` the LayerNorm config; ``rms`` the same plus
:class:`recipes._callbacks.PlainRMSNorm` (every LayerNorm swapped, nothing centered); ``cbwc`` the CBWC config;
``cbwc_all`` the same with ``replace="all"``.  Runs go two at a time (``--jobs 2``, one thread each), the LN
and exact-CBWC runs of a seed first, side by side, so that load hits both alike.  Per task: the final test
metric, the step-0 validation metric (fine-tuning: the exact conversion must not change it), the median
training step time and throughput, and the inference latency of the LN network vs the exported model.
``finetune_vit`` starts from the LN ``image_classification`` run of the first seed, so that task runs after it.

Plots need matplotlib (``pip install matplotlib``); without it the tables are still written.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes._report import finished, run_dir, write_results  # noqa: E402
from recipes._tasks import TASK_BY_NAME, VARIANT_OVERRIDES, Task  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CSV_ONLY = json.dumps(
    [
        {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": "{run_dir}", "name": "csv"},
        }
    ]
)


def command(
    task: Task, variant: str, seed: int, args: argparse.Namespace, python: str = "python"
) -> list[str]:
    """The recipe command of one run (relative paths: it runs in the repository root)."""
    base, overrides = VARIANT_OVERRIDES[variant]
    config = Path(args.configs) / task.configs[base]
    cmd = [
        python,
        f"recipes/{task.recipe}.py",
        "fit",
        "-c",
        str(config),
        f"--trainer.logger={CSV_ONLY}",
        "--trainer.enable_progress_bar=false",
        "--test_after_fit=true",
        "--export.formats=[safetensors]",
        "--export.latency_batch=64",
        f"--export.latency_repeats={args.latency_repeats}",
        *task.budgets[args.budget],  # after the defaults above: a budget may override them
        *overrides,
        *task.extra.get(variant, []),
        f"--seed_everything={seed}",
        f"--run_dir={run_dir(Path(args.out), task.name, variant, seed)}",
    ]
    if task.needs:
        ckpt = run_dir(Path(args.out), task.needs, "ln", args.seeds_list[0]) / "checkpoints" / "last.ckpt"
        cmd.append(f"--model.init_args.checkpoint={ckpt}")
    return cmd


def execute(cmd: list[str], rdir: Path, threads: int | None, dry_run: bool) -> float:
    shown = shlex.join(cmd)
    print(f"$ {shown}", flush=True)
    if dry_run:
        return 0.0
    rdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
    env.setdefault("WANDB_MODE", "offline")
    # This checkout's package, even when another checkout is installed in the environment (editable).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    with open(rdir / "run.log", "w") as log:
        proc = subprocess.run(
            [sys.executable, *cmd[1:]], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (rdir / "run.log").read_text().splitlines()[-25:]
        raise RuntimeError(f"run failed ({proc.returncode}): {shown}\n" + "\n".join(tail))
    print(f"  done in {seconds:.0f} s", flush=True)
    return seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tasks", default=",".join(TASK_BY_NAME), help=f"comma-separated, from {','.join(TASK_BY_NAME)}"
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument(
        "--budget",
        choices=("small", "tiny"),
        default="small",
        help="small: the documented results; tiny: a few steps per run (CI)",
    )
    p.add_argument(
        "--variants",
        default=None,
        help="comma-separated subset of ln,rms,cbwc,cbwc_all (default: each task's own list)",
    )
    p.add_argument("--out", default="runs/reproduce", help="run folders (relative: to the repository root)")
    p.add_argument(
        "--results", default=str(REPO / "docs" / "results.md"), help="the Markdown report to write"
    )
    p.add_argument("--configs", default="configs", help="config folder (relative: to the repository root)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS of each run (default 1: on a shared 2-core machine two threads per run were "
        "up to 5x slower under load; 0: torch's default)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="runs at a time (default 2, one core each: the LN and exact-CBWC runs of a seed side by side)",
    )
    p.add_argument("--latency-repeats", type=int, default=20)
    p.add_argument("--reuse", action="store_true", help="skip runs whose folder holds a finished run")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = p.parse_args(argv)
    args.seeds_list = list(range(args.seeds))
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = set(names) - set(TASK_BY_NAME)
    if unknown:
        p.error(f"unknown task(s) {sorted(unknown)}; choose from {', '.join(TASK_BY_NAME)}")
    args.task_names = names
    args.variant_filter = None
    if args.variants:
        args.variant_filter = [v.strip() for v in args.variants.split(",") if v.strip()]
        bad = set(args.variant_filter) - set(VARIANT_OVERRIDES)
        if bad:
            p.error(f"unknown variant(s) {sorted(bad)}; choose from {', '.join(VARIANT_OVERRIDES)}")
    args.out_abs = Path(args.out) if Path(args.out).is_absolute() else REPO / args.out
    return args


def task_variants(task: Task, args: argparse.Namespace) -> tuple[str, ...]:
    """The variants of ``task`` this invocation runs (the task's own list, cut by ``--variants``)."""
    if args.variant_filter is None:
        return task.variants
    return tuple(v for v in task.variants if v in args.variant_filter)


def run_all(args: argparse.Namespace, tasks: list[Task]) -> None:
    """Run every (task, seed, variant) not already finished (``--reuse``), two at a time."""
    out = args.out_abs
    for task in tasks:
        if task.needs and task.needs not in args.task_names:
            dep = run_dir(out, task.needs, "ln", args.seeds_list[0])
            if not finished(dep, "ln") and not args.dry_run:
                raise SystemExit(
                    f"error: {task.name} starts from {dep}/checkpoints/last.ckpt: run the {task.needs} task "
                    "first (same --out and --budget)"
                )
        # LN and exact CBWC first: with --jobs 2 those two run side by side, under the same load.
        order = sorted(task_variants(task, args), key=lambda v: ("ln", "cbwc", "rms", "cbwc_all").index(v))
        for seed in args.seeds_list:
            pending = []
            for variant in order:
                rdir = run_dir(out, task.name, variant, seed)
                if args.reuse and finished(rdir, variant):
                    print(f"reusing {rdir}")
                    continue
                pending.append((command(task, variant, seed, args), rdir))
            if args.dry_run:
                for c, r in pending:
                    execute(c, r, args.threads, dry_run=True)
                continue
            with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
                futures = [pool.submit(execute, c, r, args.threads, args.dry_run) for c, r in pending]
                for f in futures:
                    f.result()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tasks = [TASK_BY_NAME[n] for n in args.task_names]
    out = args.out_abs
    meta: dict = {"date": _dt.datetime.now().isoformat(timespec="seconds")}
    if not args.report_only:
        meta["load_start"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
        t0 = time.perf_counter()
        run_all(args, tasks)
        meta["seconds"] = time.perf_counter() - t0
        meta["load_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
        if args.dry_run:
            return 0
        out.mkdir(parents=True, exist_ok=True)
        (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    elif (out / "meta.json").is_file():
        meta = json.loads((out / "meta.json").read_text())
    shown = {t.name: [shlex.join(command(t, v, 0, args)) for v in task_variants(t, args)] for t in tasks}
    write_results(args, tasks, meta, {t.name: task_variants(t, args) for t in tasks}, shown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
