"""Does the fused residual add + RMSNorm pay?  ``add_rms_norm(x, r)`` vs ``h = x + r; rms_norm(h)``.

A pre-norm block computes ``h = x + f(x); y = norm(h)`` and passes ``h`` on.  The fused op writes ``h`` and
``y`` in one pass (one read of ``h`` less) and one call (one dispatch less).  Forward under ``no_grad`` and
forward + backward, fp32 and bf16, at decode sizes (1 and 8 rows) and full-sequence sizes; the LayerNorm
version (``x + r`` then ``F.layer_norm``) for reference.  Interleaved, rotated rounds (lightning_cbwc/
timing.py), each unit a loop of calls sized to ~1 ms; paired ratios fused/unfused with a 95% interval.

    python benchmarks/bench_fused_add.py [--rounds 30] [--json benchmarks/results/fused_add.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import tune_malloc  # noqa: E402

from lightning_cbwc.norm import functional as norm_fn  # noqa: E402
from lightning_cbwc.timing import interleaved, median_ci, paired_ratio, repeated, verdict  # noqa: E402

SHAPES = [(1, 768), (8, 768), (1, 2048), (512, 768), (4096, 768)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EPS = 1e-5


def fns_for(x, r, w, b, d, backward: bool):
    shape = (d,)

    def fused():
        return norm_fn.add_rms_norm(x, r, shape, w, b, EPS)

    def unfused():
        h = x + r
        return norm_fn.rms_norm(h, shape, w, b, EPS), h

    def layer_norm():
        h = x + r
        return F.layer_norm(h, shape, w, b, EPS), h

    fns = {"fused": fused, "unfused": unfused, "add+layer_norm": layer_norm}
    if not backward:
        return fns

    def with_backward(f):
        def run():
            y, h = f()
            torch.autograd.backward((y, h), (x, r))  # any fixed cotangents of the right shape

        return run

    return {k: with_backward(f) for k, f in fns.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--shapes", default=",".join(f"{r}x{d}" for r, d in SHAPES))
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--json", default="benchmarks/results/fused_add.json")
    args = ap.parse_args(argv)
    malloc_tuned = tune_malloc()
    status = norm_fn.kernel_status()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {status}; malloc tuned {malloc_tuned}"
    )
    print(f"load average before: {os.getloadavg()}")
    print(
        f"{'shape':>9} {'dtype':>5} {'pass':>7} | {'fused':>9} {'unfused':>9} {'add+LN':>9} us | fused/unfused [95% CI]"
    )
    rows = []
    gen = torch.Generator().manual_seed(0)
    for spec in args.shapes.split(","):
        n_rows, d = (int(v) for v in spec.split("x"))
        inner = max(1, 2000 // max(1, n_rows * d // 768))
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            x, r = (torch.randn(n_rows, d, generator=gen).to(dtype) for _ in range(2))
            w = (torch.randn(d, generator=gen) + 1).to(dtype)
            b = torch.randn(d, generator=gen).to(dtype)
            for kind in ("fwd", "fwd+bwd"):
                backward = kind == "fwd+bwd"
                leaves = [t.clone().requires_grad_(backward) for t in (x, r, w, b)]
                fns = fns_for(*leaves, d, backward)
                n_inner = max(1, inner // 4) if backward else inner
                with torch.set_grad_enabled(backward):
                    times = interleaved(
                        {k: repeated(f, n_inner) for k, f in fns.items()}, args.rounds, warmup=2
                    )
                us = {k: median_ci(v)[0] / n_inner * 1e6 for k, v in times.items()}
                ratio = paired_ratio(times, "fused", "unfused")
                rows.append(
                    {"rows": n_rows, "dim": d, "dtype": dname, "pass": kind, "us": us, "fused/unfused": ratio}
                )
                print(
                    f"{spec:>9} {dname:>5} {kind:>7} | {us['fused']:9.2f} {us['unfused']:9.2f}"
                    f" {us['add+layer_norm']:9.2f}    | {ratio[0]:.3f} [{ratio[1]:.3f}, {ratio[2]:.3f}] {verdict(ratio)}",
                    flush=True,
                )
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        env = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "kernel_status": status,
            "malloc_tuned": malloc_tuned,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        Path(args.json).write_text(json.dumps({"env": env, "results": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
