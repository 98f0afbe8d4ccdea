"""End-to-end inference: LayerNorm original vs folded RMSNorm vs the no-norm bound, measured side by side.

    python benchmarks/bench_e2e.py [--models vit_s,gpt2_512,gpt2_1024] [--dtypes fp32,bf16] [--modes eager,compile]
        [--device cpu|cuda] [--rounds 20] [--malloc-tune]

Variants of one model, timed interleaved in one process with the order rotated each round (lightning_cbwc/
timing.py).  Ratios are medians of per-round ratios to the original, with a 95% interval: "tie" means the
interval contains 1.  "bound" replaces every LayerNorm by identity: no fold can beat it.  Writes JSON (and a
PNG bar plot when matplotlib is installed) under benchmarks/results/.

On CPU the norms are a small share of a ViT-S forward (about 1% in a profile) while glibc's page faults on
fresh large blocks move whole forwards by a few percent; ``--malloc-tune`` keeps freed memory in the process
(as jemalloc / tcmalloc would) to take that noise out.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import tune_malloc  # noqa: E402

import lightning_cbwc as lc  # noqa: E402
from lightning_cbwc.timing import interleaved, paired_ratio, verdict  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(name: str) -> tuple[nn.Module, tuple]:
    if name == "vit_s":
        import timm

        model = timm.create_model("vit_small_patch16_224", pretrained=False)
        return model, (torch.randn(8, 3, 224, 224),)
    if name.startswith("gpt2_"):
        import transformers

        seq = int(name.split("_")[1])
        cfg = transformers.GPT2Config(use_cache=False)
        model = transformers.GPT2LMHeadModel(cfg)
        return model, (torch.randint(cfg.vocab_size, (1, seq)),)
    raise SystemExit(f"unknown model {name!r}: use vit_s, gpt2_512 or gpt2_1024")


def no_norm(model: nn.Module) -> nn.Module:
    """Every LayerNorm replaced by identity: the lower bound of what any norm can cost."""
    bound = copy.deepcopy(model)
    for parent in list(bound.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, nn.LayerNorm):
                setattr(parent, name, nn.Identity())
    return bound


def cast_inputs(inputs: tuple, dtype: torch.dtype) -> tuple:
    return tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vit_s,gpt2_512,gpt2_1024")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--modes", default="eager")
    ap.add_argument("--rounds", "--reps", type=int, default=20, help="timed rounds (each runs every variant)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument(
        "--malloc-tune", action="store_true", help="keep freed memory in the process (no page faults)"
    )
    ap.add_argument("--out", default="benchmarks/results/e2e.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    malloc_tuned = tune_malloc() if args.malloc_tune else False
    rows = []
    out = Path(args.out)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device_name(device)}, "
        f"malloc tuned: {malloc_tuned}, kernel: {kernel_status()}"
    )
    for name in args.models.split(","):
        base, inputs = build(name)
        base.eval()
        folded = lc.fold(base, inputs)
        fused = lc.fold(base, inputs, fuse_affine=True)
        bound = no_norm(base)
        for dt in args.dtypes.split(","):
            dtype = DTYPES[dt]
            x = tuple(t.to(device) for t in cast_inputs(inputs, dtype))
            variants = {
                "original": copy.deepcopy(base).to(device, dtype),
                "folded": copy.deepcopy(folded).to(device, dtype),
                "folded+fused": copy.deepcopy(fused).to(device, dtype),
                "bound": copy.deepcopy(bound).to(device, dtype),
            }
            for mode in args.modes.split(","):
                runners = {}
                for k, m in variants.items():
                    fn = torch.compile(m) if mode == "compile" else m
                    runners[k] = lambda fn=fn, x=x: fn(*x)
                with torch.inference_mode():
                    times = interleaved(runners, args.rounds, warmup=3 if mode == "compile" else 2, sync=sync)
                ms = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
                row = {"model": name, "dtype": dt, "mode": mode, **{f"{k}_ms": v for k, v in ms.items()}}
                for k in ("folded", "folded+fused", "bound"):
                    med, lo, hi = paired_ratio(times, k, "original")
                    row[f"{k}/original"] = med
                    row[f"{k}/original_ci95"] = [lo, hi]
                    row[f"{k}_verdict"] = verdict((med, lo, hi))
                rows.append(row)
                save(out, rows, device, malloc_tuned, args.rounds)

                def cell(k, row=row):
                    lo, hi = row[f"{k}/original_ci95"]
                    return f"{row[k + '/original']:.3f} [{lo:.3f}, {hi:.3f}]"

                print(
                    f"{name:10s} {dt:5s} {mode:8s} original {ms['original']:8.2f} ms | folded {cell('folded')} "
                    f"{row['folded_verdict']} | fused {cell('folded+fused')} | bound {cell('bound')}",
                    flush=True,
                )
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out}")
    return rows


def save(out: Path, rows: list[dict], device: torch.device, malloc_tuned: bool, rounds: int) -> None:
    """Write the rows so far (after every row: a long run that is stopped keeps what it measured)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.platform(),
        "device": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "malloc_tuned": malloc_tuned,
        "rounds": rounds,
        "kernel": kernel_status(),
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.backends.cpu.get_cpu_capability()})"


def kernel_status() -> str:
    try:
        from lightning_cbwc.norm import kernel_status as status

        return status()
    except ImportError:
        return "unknown"


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    labels = [f"{r['model']}\n{r['dtype']} {r['mode']}" for r in rows]
    keys = ["folded/original", "folded+fused/original", "bound/original"]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    width = 0.25
    for i, k in enumerate(keys):
        med = [r[k] for r in rows]
        lows = [r[k] - r[f"{k}_ci95"][0] for r in rows]
        highs = [r[f"{k}_ci95"][1] - r[k] for r in rows]
        err = [lows, highs]
        ax.bar([j + i * width for j in range(len(rows))], med, width, yerr=err, capsize=2, label=k)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([j + width for j in range(len(rows))], labels, fontsize=8)
    ax.set_ylabel("time / LayerNorm original")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
