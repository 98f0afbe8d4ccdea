"""Per-call cost of the folded norm at decode sizes: module call to kernel return, vs ``nn.LayerNorm``.

Token-by-token generation runs every norm on 1-8 rows, where the call (Python module, op resolution,
dispatch, allocation) costs more than the arithmetic.  For rows x dim in {1, 8} x {768, 2048}, fp32 and bf16,
under ``torch.no_grad``: ``nn.LayerNorm`` vs our ``RMSNorm`` (as a fold makes it) as modules, and the bare
``F.layer_norm`` / ``lightning_cbwc::rms_norm`` calls beneath them.  Each timed unit is a loop of ``--inner``
calls; units are interleaved in rotated order (lightning_cbwc/timing.py) and the module ratio is paired per
round, with a 95% interval.

    python benchmarks/bench_call_overhead.py [--rounds 40] [--inner 200] [--json benchmarks/results/call_overhead.json]
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
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_cbwc.norm import RMSNorm  # noqa: E402
from lightning_cbwc.norm import functional as norm_fn  # noqa: E402
from lightning_cbwc.timing import interleaved, median_ci, paired_ratio, repeated, verdict  # noqa: E402

SHAPES = [(1, 768), (8, 768), (1, 2048), (8, 2048)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--inner", type=int, default=200, help="calls per timed unit")
    ap.add_argument("--shapes", default=",".join(f"{r}x{d}" for r, d in SHAPES))
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--json", default="benchmarks/results/call_overhead.json")
    args = ap.parse_args(argv)
    status = norm_fn.kernel_status()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {status}")
    print(f"load average before: {os.getloadavg()}")
    header = f"{'shape':>7} {'dtype':>5} | {'LN mod':>7} {'ours mod':>8} {'F.ln':>6} {'op':>6} | ours/LN module [95% CI]"
    print(header + "\n" + "-" * len(header))
    rows_out = []
    op = torch.ops.lightning_cbwc.rms_norm.default if norm_fn.load_kernels() else None
    for spec in args.shapes.split(","):
        rows, d = (int(v) for v in spec.split("x"))
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            ln = nn.LayerNorm(d).to(dtype)
            with torch.no_grad():
                ln.weight.normal_(1.0, 0.1)
                ln.bias.normal_(0.0, 0.1)
            ours = RMSNorm.from_layer_norm(nn.LayerNorm(d).to(dtype))
            ours.load_state_dict(ln.state_dict())
            x = torch.randn(1, rows, d, dtype=dtype)
            x = x - x.mean(-1, keepdim=True)
            fns = {
                "ln_module": lambda ln=ln, x=x: ln(x),
                "ours_module": lambda ours=ours, x=x: ours(x),
                "f_layer_norm": lambda ln=ln, x=x, d=d: F.layer_norm(x, (d,), ln.weight, ln.bias, ln.eps),
            }
            if op is not None:
                fns["op"] = lambda ours=ours, x=x, d=d: op(x, (d,), ours.weight, ours.bias, ours.eps)
            with torch.no_grad():
                times = interleaved(
                    {k: repeated(f, args.inner) for k, f in fns.items()}, args.rounds, warmup=2
                )
            us = {k: median_ci(v)[0] / args.inner * 1e6 for k, v in times.items()}
            ratio = paired_ratio(times, "ours_module", "ln_module")
            row = {"rows": rows, "dim": d, "dtype": dname, "us_per_call": us, "ours_over_ln_module": ratio}
            rows_out.append(row)
            op_us = f"{us['op']:6.2f}" if "op" in us else f"{'-':>6}"
            print(
                f"{spec:>7} {dname:>5} | {us['ln_module']:7.2f} {us['ours_module']:8.2f} {us['f_layer_norm']:6.2f}"
                f" {op_us} | {ratio[0]:.3f} [{ratio[1]:.3f}, {ratio[2]:.3f}] {verdict(ratio)}",
                flush=True,
            )
    print(f"load average after: {os.getloadavg()}")
    worst = max(r["ours_over_ln_module"][0] for r in rows_out)
    print(
        f"[{'met' if worst <= 1.0 else 'NOT met'}] folded norm call <= nn.LayerNorm call at decode sizes: worst {worst:.3f}"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        env = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "kernel_status": status,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "rounds": args.rounds,
            "inner": args.inner,
        }
        Path(args.json).write_text(json.dumps({"env": env, "results": rows_out}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
