"""End-to-end inference: LayerNorm original vs folded RMSNorm vs the no-norm bound, measured side by side.

    python benchmarks/bench_e2e.py [--models vit_s,gpt2_512,gpt2_1024] [--dtypes fp32,bf16] [--modes eager,compile]

Variants of one model, timed interleaved (A B C A B C ...) in one process; medians and ratios to the
original.  "bound" replaces every LayerNorm by identity: no fold can beat it.  Writes JSON (and a PNG bar
plot when matplotlib is installed) under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import lightning_cbwc as lc

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


@torch.inference_mode()
def interleaved(fns: dict, reps: int, warmup: int = 2) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vit_s,gpt2_512,gpt2_1024")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--modes", default="eager")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/e2e.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernel: {kernel_status()}")
    for name in args.models.split(","):
        base, inputs = build(name)
        base.eval()
        folded = lc.fold(base, inputs)
        fused = lc.fold(base, inputs, fuse_affine=True)
        bound = no_norm(base)
        for dt in args.dtypes.split(","):
            dtype = DTYPES[dt]
            x = cast_inputs(inputs, dtype)
            variants = {
                "original": copy.deepcopy(base).to(dtype),
                "folded": copy.deepcopy(folded).to(dtype),
                "folded+fused": copy.deepcopy(fused).to(dtype),
                "bound": copy.deepcopy(bound).to(dtype),
            }
            for mode in args.modes.split(","):
                runners = {}
                for k, m in variants.items():
                    fn = torch.compile(m) if mode == "compile" else m
                    runners[k] = lambda fn=fn, x=x: fn(*x)
                ms = interleaved(runners, args.reps)
                row = {"model": name, "dtype": dt, "mode": mode, **{f"{k}_ms": v for k, v in ms.items()}}
                for k in ("folded", "folded+fused", "bound"):
                    row[f"{k}/original"] = ms[k] / ms["original"]
                rows.append(row)
                print(
                    f"{name:10s} {dt:5s} {mode:8s} original {ms['original']:8.2f} ms | folded {ms['folded']:8.2f} "
                    f"({row['folded/original']:.3f}) | fused {ms['folded+fused']:8.2f} "
                    f"({row['folded+fused/original']:.3f}) | no-norm bound {ms['bound']:8.2f} "
                    f"({row['bound/original']:.3f})",
                    flush=True,
                )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out}")
    return rows


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
        ax.bar([j + i * width for j in range(len(rows))], [r[k] for r in rows], width, label=k)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([j + width for j in range(len(rows))], labels, fontsize=8)
    ax.set_ylabel("time / LayerNorm original")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
