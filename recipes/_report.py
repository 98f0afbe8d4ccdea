"""The reproduction's report (``docs/results.md``): read the finished runs, tabulate them per task and variant,
state per task how each variant compares with LayerNorm and with plain RMSNorm, plot the training curves."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
from pathlib import Path

from recipes._tasks import VARIANT_LABEL, Task

#: |difference of means| <= SPREAD x the pooled seed-to-seed std is "within the seed spread"
SPREAD = 2.0


def run_dir(out: Path, task: str, variant: str, seed: int) -> Path:
    return out / task / variant / f"seed{seed}"


def export_report(rdir: Path) -> dict | None:
    """The ``report`` section of a run's export sidecar (``export/cbwc.json``), or None."""
    from lightning_cbwc.errors import CheckpointError
    from lightning_cbwc.export.sidecar import read_sidecar

    try:
        return read_sidecar(rdir / "export").get("report")
    except (OSError, CheckpointError):
        return None


def finished(rdir: Path, variant: str) -> bool:
    """A run that tested its final weights (and, but for the plain swap, exported them)."""
    try:
        summary = json.loads((rdir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return summary.get("test") is not None and (variant == "rms" or export_report(rdir) is not None)


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


def collect(out: Path, tasks: list[Task], seeds: list[int], variants: dict[str, tuple[str, ...]]) -> dict:
    data: dict = {}
    for task in tasks:
        for variant in variants[task.name]:
            runs = [r for s in seeds if (r := load_run(run_dir(out, task.name, variant, s))) is not None]
            data[(task.name, variant)] = runs
    return data


def _test(runs: list[dict], key: str) -> list[float]:
    return [r["test"].get(f"test/{key}") for r in runs if r.get("test")]


def _steps(runs: list[dict]) -> list[float]:
    return [r["step_ms"]["median"] for r in runs if r.get("step_ms")]


def _throughput(runs: list[dict]) -> str:
    """Median tokens (token inputs) or samples per second of training."""
    rates, unit = [], ""
    for r in runs:
        batch, step = r.get("batch") or {}, r.get("step_ms") or {}
        n = batch.get("tokens") or batch.get("samples")
        if n and step.get("median"):
            rates.append(n / (step["median"] / 1e3))
            unit = "tok/s" if batch.get("tokens") else "img/s"
    return f"{statistics.fmean(rates):,.0f} {unit}" if rates else "n/a"


def table(data: dict, tasks: list[Task], variants: dict[str, tuple[str, ...]]) -> list[str]:
    lines = [
        "| task | variant | seeds | LayerNorms | test metric | final val metric | step-0 val metric | "
        "train step (ms) | step / LN step | training throughput | LN inference (ms) | exported inference (ms) | "
        "export max error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task in tasks:
        key = task.metric
        digits = 2 if key == "ppl" else 4
        ln_step = mean_std(_steps(data.get((task.name, "ln"), [])))[0]
        for variant in variants[task.name]:
            runs = data.get((task.name, variant), [])
            if not runs:
                continue
            val = [r["val"][-1].get(f"val/{key}") for r in runs if r.get("val")]
            step0 = [r["step0"].get(f"val/{key}") for r in runs if r.get("step0")]
            steps = _steps(runs)
            ratio = mean_std(steps)[0] / ln_step if steps and ln_step == ln_step else float("nan")
            lat = [r["export"].get("latency_ms", {}) for r in runs]
            ln_lat = [x.get("layernorm") for x in lat if x.get("layernorm") is not None]
            fold_lat = [x.get("folded") for x in lat if x.get("folded") is not None]
            err = [r["export"].get("max_error") for r in runs if r["export"].get("max_error") is not None]
            plan = next((r["export"]["plan"] for r in runs if r["export"].get("plan")), None)
            if variant == "rms":
                plan = "all swapped, none centered"
            batch = next(
                (r["export"]["latency_batch"] for r in runs if r["export"].get("latency_batch")), None
            )
            at = f" (b{batch})" if batch else ""
            lines.append(
                f"| {task.name} | {VARIANT_LABEL[variant]} | {len(runs)} | {plan or 'n/a'} | "
                f"{key} {fmt(_test(runs, key), digits)} | {fmt(val, digits)} | "
                f"{fmt(step0, digits) if step0 else '–'} | {fmt(steps, 1)} | "
                f"{'n/a' if ratio != ratio else f'{ratio:.2f}x'} | {_throughput(runs)} | "
                f"{fmt(ln_lat, 1) if ln_lat else '–'}{at if ln_lat else ''} | "
                f"{fmt(fold_lat, 1) if fold_lat else '–'}{at if fold_lat else ''} | "
                f"{f'{max(err):.1e}' if err else '–'} |"
            )
    return lines


def compare(a: list[float], b: list[float], higher_is_better: bool) -> tuple[float, float, bool, str]:
    """(mean(a) - mean(b), the pooled seed std, whether the difference is within SPREAD x that std, and
    "better" / "worse" for a)."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    delta = ma - mb
    pooled = math.sqrt((sa**2 + sb**2) / 2)
    within = abs(delta) <= SPREAD * pooled + 1e-12
    better = (delta > 0) == higher_is_better
    return delta, pooled, within, "better" if better else "worse"


def _verdict(a: list[float], b: list[float], higher_is_better: bool, digits: int) -> str:
    """ "equal", or how much better / worse ``a`` is than ``b`` and whether that is within the seed spread."""
    delta, pooled, within, word = compare(a, b, higher_is_better)
    if delta == 0:
        return "equal"
    size = f"{abs(delta):.{digits}f} {word}"
    if min(len(a), len(b)) < 2:
        return f"{size} (one seed: no spread to compare with)"
    where = "within" if within else "outside"
    return f"{size}, **{where} the seed spread** ({SPREAD:g} x pooled std = {SPREAD * pooled:.{digits}f})"


def verdicts(data: dict, tasks: list[Task], variants: dict[str, tuple[str, ...]]) -> list[str]:
    """One paragraph per task: each variant against LayerNorm, CBWC against plain RMSNorm, step-time ratios."""
    lines = []
    for task in tasks:
        key, digits = task.metric, (2 if task.metric == "ppl" else 4)
        by = {v: _test(data.get((task.name, v), []), key) for v in variants[task.name]}
        if not by.get("ln"):
            continue
        parts = []
        for v in ("cbwc", "cbwc_all", "rms"):
            if by.get(v):
                verdict = _verdict(by[v], by["ln"], task.higher_is_better, digits)
                parts.append(
                    f"{VARIANT_LABEL[v]}: {key} {fmt(by[v], digits)} vs LayerNorm's {fmt(by['ln'], digits)}: "
                    + verdict
                )
        for v in ("cbwc", "cbwc_all"):
            if by.get(v) and by.get("rms"):
                verdict = _verdict(by[v], by["rms"], task.higher_is_better, digits)
                parts.append(f"{VARIANT_LABEL[v]} vs plain RMSNorm: " + verdict)
        ln_step = mean_std(_steps(data.get((task.name, "ln"), [])))[0]
        ratios = [
            f"{VARIANT_LABEL[v]} {mean_std(_steps(data[(task.name, v)]))[0] / ln_step:.2f}x"
            for v in variants[task.name]
            if v != "ln" and _steps(data.get((task.name, v), []))
        ]
        lines.append(f"- **{task.name}** ({task.label}). {task.note}")
        lines += [f"  - {p}." for p in parts]
        if ratios:
            lines.append("  - Training step vs LayerNorm's: " + ", ".join(ratios) + ".")
    return lines


def plot(data: dict, tasks: list[Task], variants: dict[str, tuple[str, ...]], folder: Path) -> list[Path]:
    """One PNG per task: training loss and validation metric vs step per variant, mean over seeds ± std."""
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
    style = {
        "ln": ("tab:blue", "-"),
        "rms": ("tab:green", ":"),
        "cbwc": ("tab:orange", "--"),
        "cbwc_all": ("tab:red", "-."),
    }
    for task in tasks:
        runs_by_variant = {v: data.get((task.name, v), []) for v in variants[task.name]}
        if not any(runs_by_variant.values()):
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for variant, runs in runs_by_variant.items():
            color, line = style[variant]
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
                    linestyle=line,
                    label=f"{VARIANT_LABEL[variant]} ({len(curves)} seeds)",
                    color=color,
                    marker="o" if series == "val" else None,
                    ms=3,
                )
                if len(curves) > 1:
                    ax.fill_between(steps, m - s, m + s, color=color, alpha=0.15)
        axes[0].set(title="training loss", xlabel="step", ylabel="loss")
        axes[1].set(title=f"validation {task.metric}", xlabel="step", ylabel=task.metric)
        for ax in axes:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
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


_READING = [
    "How to read it:",
    "",
    "- **Variants.** *LayerNorm*: the model as built. *RMSNorm (plain swap)*: every LayerNorm replaced by an "
    "RMSNorm with its weight, bias and eps, nothing centered (what people pick instead of LayerNorm). "
    "*CBWC + RMSNorm (exact)*: `CBWC()`, the LayerNorms whose input the centered writers make zero-mean "
    'become RMSNorms, the others stay LayerNorms. *CBWC + RMSNorm (replace="all")*: `CBWC(replace="all")`, '
    "every LayerNorm becomes an RMSNorm, approximately where its input is not zero-mean.",
    "- **Exact CBWC** trains along the LayerNorm model's function trajectory in exact arithmetic (the "
    "gradient a LayerNorm sends to its writers is already centered, and the mean component CBWC removes is "
    "invisible to the LN model), so its metrics differ from LayerNorm's only by float rounding grown over the "
    'steps. Where every LayerNorm folds, `replace="all"` is that same run and is left out.',
    '- **replace="all"** and the plain swap change the function: their difference from LayerNorm is what '
    "partially broken exactness costs (or buys). For a pretrained model the step-0 column shows it before "
    "any training.",
    f"- **Within the seed spread**: |difference of the means| <= {SPREAD:g} x the pooled standard deviation "
    "over seeds of the two variants (3 seeds: a coarse test; a difference outside it is worth a closer look, "
    "one inside it is not evidence of equality).",
    "- **Step time** is the median wall time of a training step (forward, backward, optimizer step, CBWC's "
    "projection) of runs sharing the machine two at a time; benchmarks/bench_training.py has the controlled, "
    "interleaved comparison (BENCHMARKS.md).",
    "- **Export**: the LN network's and the exported network's eager latency at the batch in parentheses, "
    'and the largest relative difference of the export from the trained network (for `replace="all"` runs: '
    "also of each exact site's RMSNorm from LayerNorm on the same input). The plain swap is not exported.",
    "",
]


def write_results(
    args: argparse.Namespace,
    tasks: list[Task],
    meta: dict,
    variants: dict[str, tuple[str, ...]],
    commands: dict[str, list[str]],
) -> Path:
    data = collect(args.out_abs, tasks, args.seeds_list, variants)
    results = Path(args.results)
    plots = plot(data, tasks, variants, results.parent / "results")
    date = meta.get("date", _dt.datetime.now().isoformat(timespec="seconds"))
    lines = [
        "# Results: LayerNorm vs plain RMSNorm vs CBWC + RMSNorm",
        "",
        f"Written by `recipes/reproduce.py` on {date}; budget `{args.budget}`, seeds {args.seeds_list}, "
        f"{args.threads or 'default'} thread(s) per run (`OMP_NUM_THREADS`), {args.jobs} run(s) at a time.",
        "",
        "## Machine",
        "",
        *machine(),
        f"- load average at start / end: {meta.get('load_start', 'n/a')} / {meta.get('load_end', 'n/a')}",
        f"- wall time of all runs: {meta.get('seconds', 0) / 60:.1f} min" if meta.get("seconds") else "",
        "",
        "## What the runs say",
        "",
        *verdicts(data, tasks, variants),
        "",
        "## Table",
        "",
        "Mean ± std over seeds.  *LayerNorms*: the fold plan of the exported model.  *test metric*: accuracy "
        "(higher is better) or perplexity (lower is better) of the final weights on the test split.  *step-0 val "
        "metric*: validation before the first step.",
        "",
        *table(data, tasks, variants),
        "",
        *_READING,
    ]
    if plots:
        lines += ["## Training curves", ""]
        for p in plots:
            lines += [f"![{p.stem}]({p.relative_to(results.parent).as_posix()})", ""]
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
        for shown in commands[task.name]:
            shown = shown.replace("--seed_everything=0", "--seed_everything={seed}").replace(
                "/seed0", "/seed{seed}"
            )
            lines.append(f"OMP_NUM_THREADS={args.threads} {shown}" if args.threads else shown)
    lines += ["```", ""]
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text("\n".join(lines) + "\n")
    print(
        f"wrote {results}" + (f" and {len(plots)} plot(s) in {results.parent / 'results'}" if plots else "")
    )
    return results
