"""Reproduce the comparison: LayerNorm baseline vs CBWC + RMSNorm on every recipe, several seeds, at a budget
that runs on a 2-core CPU in well under an hour; writes ``docs/results.md`` and training-curve plots.

    python recipes/reproduce.py                       # 3 seeds, budget "small" (the documented results)
    python recipes/reproduce.py --budget tiny --seeds 1 --tasks image_classification --out /tmp/repro
    python recipes/reproduce.py --report-only         # rebuild docs/results.md from finished runs
    lightning-cbwc reproduce ...                       # the same

Every run is the recipe's own command (``python recipes/RECIPE.py fit -c configs/CONFIG.yaml`` plus the
budget's overrides), in a subprocess, written under ``--out``; the exact commands are in the results.  The LN
and CBWC runs of a seed run side by side (``--jobs 2``, one thread each) so that load hits both alike.  Per task: the final
test metric (accuracy, or perplexity for text), the step-0 validation metric of the fine-tuning tasks (CBWC
must not change it), the median training step time, and the PyTorch inference latency of the LN network vs
its fold (CBWC + RMSNorm; batch 64, 16 for MiniLM) with the fold's max relative error.  ``finetune_vit``
starts from the LN ``image_classification`` run of the first seed, so that task runs after it.

Plots need matplotlib (``pip install matplotlib``); without it the tables are still written.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CSV_ONLY = json.dumps(
    [
        {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": "{run_dir}", "name": "csv"},
        }
    ]
)


@dataclass
class Task:
    name: str
    recipe: str
    configs: dict[str, str]  # variant -> config file name
    metric: str  # test metric key (without "test/")
    higher_is_better: bool
    budgets: dict[str, list[str]]
    needs: str | None = None  # a task whose first-seed LN run provides a checkpoint
    label: str = ""
    extra: dict[str, list[str]] = field(default_factory=dict)  # per-variant extra overrides


TASKS = [
    Task(
        "image_classification",
        "image_classification",
        {"ln": "image_classification_ln.yaml", "cbwc": "image_classification_cbwc.yaml"},
        "acc",
        True,
        {
            "small": [
                "--data.train_size=30000",
                "--data.val_size=2000",
                "--trainer.max_epochs=2",
                "--model.patch_size=7",
                "--model.embed_dim=64",
                "--model.num_heads=4",
                "--model.lr=3e-3",
                "--model.warmup_steps=30",
            ],
            "tiny": [
                "--data.train_size=256",
                "--data.val_size=128",
                "--data.test_size=128",
                "--data.batch_size=64",
                "--trainer.max_epochs=1",
                "--model.patch_size=7",
                "--model.embed_dim=32",
                "--model.depth=2",
                "--model.num_heads=2",
            ],
        },
        label="ViT on Fashion-MNIST (test accuracy)",
    ),
    Task(
        "text_generation",
        "text_generation",
        {"ln": "text_generation_ln.yaml", "cbwc": "text_generation_cbwc.yaml"},
        "ppl",
        False,
        {
            "small": [
                "--data.block_size=64",
                "--data.batch_size=32",
                "--model.n_layer=2",
                "--model.n_head=4",
                "--model.n_embd=64",
                "--trainer.max_steps=600",
                "--trainer.val_check_interval=150",
                "--data.val_samples=256",
            ],
            "tiny": [
                "--data.plays=[hamlet]",
                "--data.block_size=32",
                "--data.batch_size=8",
                "--model.n_layer=1",
                "--model.n_head=2",
                "--model.n_embd=32",
                "--trainer.max_steps=4",
                "--trainer.val_check_interval=2",
                "--data.val_samples=16",
            ],
        },
        label="char GPT-2 on Shakespeare (test perplexity)",
    ),
    Task(
        "finetune_vit",
        "finetune",
        {"ln": "finetune_vit_digits_ln.yaml", "cbwc": "finetune_vit_digits_cbwc.yaml"},
        "acc",
        True,
        {
            "small": ["--trainer.max_epochs=2"],
            "tiny": [
                "--data.init_args.train_size=128",
                "--trainer.max_steps=2",
                "--data.init_args.batch_size=32",
            ],
        },
        needs="image_classification",
        label="Fashion-MNIST ViT fine-tuned on MNIST digits (test accuracy)",
    ),
    Task(
        "finetune_minilm",
        "finetune",
        {"ln": "finetune_minilm_genre_ln_lora.yaml", "cbwc": "finetune_minilm_genre_cbwc_lora.yaml"},
        "acc",
        True,
        {
            "small": [
                "--data.init_args.lines_per_class=1000",
                "--data.init_args.eval_lines_per_class=200",
                "--data.init_args.max_length=24",
                "--model.init_args.max_length=24",
                "--model.init_args.lr=2e-3",
                "--trainer.max_epochs=3",
                "--export.latency_batch=16",
            ],
            "tiny": [
                "--data.init_args.lines_per_class=16",
                "--data.init_args.eval_lines_per_class=8",
                "--data.init_args.max_length=16",
                "--model.init_args.max_length=16",
                "--data.init_args.batch_size=8",
                "--trainer.max_steps=2",
            ],
        },
        label="MiniLM + LoRA, comedy vs tragedy lines (test accuracy)",
    ),
]
TASK_BY_NAME = {t.name: t for t in TASKS}
VARIANTS = ("ln", "cbwc")
VARIANT_LABEL = {"ln": "LayerNorm", "cbwc": "CBWC + RMSNorm"}


def run_dir(out: Path, task: str, variant: str, seed: int) -> Path:
    return out / task / variant / f"seed{seed}"


def command(
    task: Task, variant: str, seed: int, args: argparse.Namespace, python: str = "python"
) -> list[str]:
    """The recipe command of one run (relative paths: it runs in the repository root)."""
    config = Path(args.configs) / task.configs[variant]
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
        *task.extra.get(variant, []),
        f"--seed_everything={seed}",
        f"--run_dir={run_dir(Path(args.out), task.name, variant, seed)}",
    ]
    if task.needs:
        ckpt = run_dir(Path(args.out), task.needs, "ln", args.seeds_list[0]) / "checkpoints" / "last.ckpt"
        cmd.append(f"--model.init_args.checkpoint={ckpt}")
    return cmd


def export_report(rdir: Path) -> dict | None:
    """The ``report`` section of a run's export sidecar (``export/cbwc.json``), or None."""
    from lightning_cbwc.errors import CheckpointError
    from lightning_cbwc.export.sidecar import read_sidecar

    try:
        return read_sidecar(rdir / "export").get("report")
    except (OSError, CheckpointError):
        return None


def finished(rdir: Path) -> bool:
    try:
        summary = json.loads((rdir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return summary.get("test") is not None and export_report(rdir) is not None


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


# ------------------------------------------------------------------------------------------ results


def load_run(rdir: Path) -> dict | None:
    try:
        summary = json.loads((rdir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    summary["export"] = export_report(rdir) or {}
    return summary


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], digits: int = 4) -> str:
    m, s = mean_std(values)
    if m != m:  # nan
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def collect(out: Path, tasks: list[Task], seeds: list[int]) -> dict:
    data: dict = {}
    for task in tasks:
        for variant in VARIANTS:
            runs = [r for s in seeds if (r := load_run(run_dir(out, task.name, variant, s))) is not None]
            data[(task.name, variant)] = runs
    return data


def table(data: dict, tasks: list[Task]) -> list[str]:
    lines = [
        "| task | variant | seeds | test metric | final val metric | step-0 val metric | train step (ms) | "
        "LN inference (ms) | folded inference (ms) | fold max error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task in tasks:
        key = task.metric
        digits = 2 if key == "ppl" else 4
        for variant in VARIANTS:
            runs = data.get((task.name, variant), [])
            if not runs:
                continue
            test = [r["test"].get(f"test/{key}") for r in runs if r.get("test")]
            val = [r["val"][-1].get(f"val/{key}") for r in runs if r.get("val")]
            step0 = [r["step0"].get(f"val/{key}") for r in runs if r.get("step0")]
            step = [r["step_ms"]["median"] for r in runs if r.get("step_ms")]
            lat = [r["export"].get("latency_ms", {}) for r in runs]
            ln_lat = [x.get("layernorm") for x in lat if x.get("layernorm") is not None]
            fold_lat = [x.get("folded") for x in lat if x.get("folded") is not None]
            err = [r["export"].get("max_error") for r in runs if r["export"].get("max_error") is not None]
            metric = f"{key} {fmt(test, digits)}"
            err_s = f"{max(err):.1e}" if err else "n/a"
            batch = next(
                (r["export"]["latency_batch"] for r in runs if r["export"].get("latency_batch")), None
            )
            at = f" (b{batch})" if batch else ""
            step0_s = fmt(step0, digits) if step0 else "–"
            lines.append(
                f"| {task.name} | {VARIANT_LABEL[variant]} | {len(runs)} | {metric} | {fmt(val, digits)} | "
                f"{step0_s} | {fmt(step, 1)} | {fmt(ln_lat, 1)}{at} | {fmt(fold_lat, 1)}{at} | {err_s} |"
            )
    return lines


def plot(data: dict, tasks: list[Task], folder: Path) -> list[Path]:
    """One PNG per task: training loss and validation metric vs step, LN vs CBWC, mean over seeds ± std."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    colors = {"ln": "tab:blue", "cbwc": "tab:orange"}
    for task in tasks:
        runs_by_variant = {v: data.get((task.name, v), []) for v in VARIANTS}
        if not any(runs_by_variant.values()):
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for variant, runs in runs_by_variant.items():
            for ax, series, key in ((axes[0], "train", "loss"), (axes[1], "val", f"val/{task.metric}")):
                curves = [[(e["step"], e[key]) for e in r.get(series, []) if key in e] for r in runs]
                curves = [c for c in curves if c]
                if not curves:
                    continue
                n = min(len(c) for c in curves)
                steps = np.array([p[0] for p in curves[0][:n]])
                ys = np.array([[p[1] for p in c[:n]] for c in curves])
                m, s = ys.mean(0), ys.std(0)
                ax.plot(
                    steps,
                    m,
                    linestyle="--" if variant == "cbwc" else "-",
                    label=f"{VARIANT_LABEL[variant]} ({len(curves)} seeds)",
                    color=colors[variant],
                    marker="o" if series == "val" else None,
                    ms=3,
                )
                if len(curves) > 1:
                    ax.fill_between(steps, m - s, m + s, color=colors[variant], alpha=0.2)
        axes[0].set(title="training loss", xlabel="step", ylabel="loss")
        axes[1].set(title=f"validation {task.metric}", xlabel="step", ylabel=task.metric)
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(task.label or task.name)
        fig.tight_layout()
        path = folder / f"{task.name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def machine() -> list[str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    versions = [f"torch {torch.__version__}"]
    for mod in ("lightning", "timm", "transformers", "peft", "torchmetrics"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except Exception:
            pass
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores; {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}; " + ", ".join(versions),
    ]


def write_results(args: argparse.Namespace, tasks: list[Task], meta: dict) -> Path:
    out = args.out_abs
    data = collect(out, tasks, args.seeds_list)
    results = Path(args.results)
    plots = plot(data, tasks, results.parent / "results")
    lines = [
        "# Results: LayerNorm vs CBWC + RMSNorm",
        "",
        f"Written by `recipes/reproduce.py` on {meta.get('date', _dt.datetime.now().isoformat(timespec='seconds'))}; "
        f"budget `{args.budget}`, seeds {args.seeds_list}, {args.threads or 'default'} thread(s) per run "
        f"(`OMP_NUM_THREADS`), {args.jobs} run(s) at a time (the LN and CBWC runs of a seed side by side).",
        "",
        "## Machine",
        "",
        *machine(),
        f"- load average at start / end: {meta.get('load_start', 'n/a')} / {meta.get('load_end', 'n/a')} "
        "(the LN and CBWC runs of a seed run at the same time, so both see the same load)",
        f"- wall time of all runs: {meta.get('seconds', 0) / 60:.1f} min" if meta.get("seconds") else "",
        "",
        "## Table",
        "",
        "Mean ± std over seeds.  *test metric*: accuracy (higher is better) or perplexity (lower is better) of the "
        "final weights on the test split.  *step-0 val metric*: validation before the first step (fine-tuning "
        "tasks): CBWC's conversion must leave it unchanged.  *train step*: median wall time of a training step "
        "(forward, backward, optimizer step, CBWC's projection).  *inference*: median PyTorch eager latency, at "
        "the batch size in parentheses, of the LayerNorm network and of its fold (CBWC + RMSNorm, the exported "
        "model), measured interleaved at the end of each run.  *fold max error*: max |folded - trained| / RMS(trained output).",
        "",
        *table(data, tasks),
        "",
        "What to expect when reading it:",
        "",
        "- **Metrics.** In exact arithmetic CBWC + RMSNorm trains along the same function trajectory as the "
        "LayerNorm model.",
        "  - The gradient a LayerNorm sends back to the linears that write its input is already centered (LN's "
        "backward removes the mean).",
        "  - So the optimizer sees the same gradients, and the mean component of the weights, which CBWC "
        "projects away, is invisible to the LN model's output.",
        "  - The metrics therefore agree up to float rounding. Over many steps that rounding can grow into "
        "differences of the size of the seed-to-seed spread.",
        "- **Step time.** CBWC's step adds the projection of every writer and its gradient, a fixed cost per "
        "tensor. On these small models it weighs more than the norms save.",
        "  - benchmarks/bench_training.py measures a ViT-S step, where the projection is under 1% of it.",
        "- **Latency.** Two runs share the machine, so the latency columns carry that noise; BENCHMARKS.md "
        "has the controlled comparison.",
        "",
    ]
    if plots:
        lines += ["## Training curves", ""]
        for p in plots:
            lines.append(f"![{p.stem}]({p.relative_to(results.parent).as_posix()})")
            lines.append("")
    lines += [
        "## Commands",
        "",
        "From the repository root; `{seed}` takes each of the seeds.  The whole set: "
        f"`python recipes/reproduce.py --budget {args.budget} --seeds {len(args.seeds_list)}"
        f" --threads {args.threads} --jobs {args.jobs}`.",
        "",
        "```bash",
    ]
    for task in tasks:
        for variant in VARIANTS:
            cmd = command(task, variant, 0, args)
            shown = (
                shlex.join(cmd)
                .replace("--seed_everything=0", "--seed_everything={seed}")
                .replace("/seed0", "/seed{seed}")
            )
            lines.append(f"OMP_NUM_THREADS={args.threads} {shown}" if args.threads else shown)
    lines += ["```", ""]
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text("\n".join(lines) + "\n")
    print(
        f"wrote {results}" + (f" and {len(plots)} plot(s) in {results.parent / 'results'}" if plots else "")
    )
    return results


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tasks", default=",".join(TASK_BY_NAME), help=f"comma-separated, from {','.join(TASK_BY_NAME)}"
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument(
        "--budget", choices=("small", "tiny"), default="small", help="small: the documented results"
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
        help="runs at a time: 2 runs the LN and CBWC runs of a seed side by side (default; one core each)",
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
    args.out_abs = Path(args.out) if Path(args.out).is_absolute() else REPO / args.out
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tasks = [TASK_BY_NAME[n] for n in args.task_names]
    out = args.out_abs
    meta: dict = {"date": _dt.datetime.now().isoformat(timespec="seconds")}
    if not args.report_only:
        meta["load_start"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
        t0 = time.perf_counter()
        for task in tasks:
            if task.needs and task.needs not in args.task_names:
                dep = run_dir(out, task.needs, "ln", args.seeds_list[0])
                if not finished(dep) and not args.dry_run:
                    raise SystemExit(
                        f"error: {task.name} starts from {dep}/checkpoints/last.ckpt: run the {task.needs} task first "
                        f"(same --out and --budget)"
                    )
            for seed in args.seeds_list:
                pending = []
                for variant in VARIANTS:
                    rdir = run_dir(out, task.name, variant, seed)
                    if args.reuse and finished(rdir):
                        print(f"reusing {rdir}")
                        continue
                    pending.append((command(task, variant, seed, args), rdir))
                # The LN and CBWC runs of one seed side by side (--jobs 2): same load on both, half the time.
                with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
                    futures = [pool.submit(execute, c, r, args.threads, args.dry_run) for c, r in pending]
                    for f in futures:
                        f.result()
        meta["seconds"] = time.perf_counter() - t0
        meta["load_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
        if not args.dry_run:
            out.mkdir(parents=True, exist_ok=True)
            (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    elif (out / "meta.json").is_file():
        meta = json.loads((out / "meta.json").read_text())
    if args.dry_run:
        return 0
    write_results(args, tasks, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
