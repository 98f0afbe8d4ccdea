"""The norm backward with cold caches, as a model's step sees it: ATen's LayerNorm backward against the swapped
norm's (``lightning_cbwc::rms_norm_backward``, ``zero_mean=True``), over K distinct inputs per round so that
every call reads its x and dy from memory, not from a cache the previous call warmed (bench_kernels.py times
one tensor again and again).  Output masks: dx, dw, db (a training step) and dx alone.

    python benchmarks/bench_norm_backward.py [--shape 2048x768] [--inputs 9] [--threads 2]

Prints, per mask, the min ms of each and the paired per-round ratio ours / ATen with its 95% interval.
"""

from __future__ import annotations

import argparse

import torch

from lightning_cbwc.norm import cpu
from lightning_cbwc.timing import interleaved, paired_ratio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="2048x768", help="rows x dim")
    p.add_argument("--inputs", type=int, default=9, help="distinct inputs per round (9 = a 4-layer GPT-2)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=30)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows, d = (int(v) for v in a.shape.split("x"))
    ok, reason = cpu.load()
    if not ok:
        raise SystemExit(f"no CPU kernel: {reason}")
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(rows, d, generator=gen) for _ in range(a.inputs)]
    xs = [x - x.mean(-1, keepdim=True) for x in xs]
    gs = [torch.randn(rows, d, generator=gen) for _ in range(a.inputs)]
    w, b = torch.rand(d, generator=gen) + 0.5, torch.zeros(d)
    stats = [torch.ops.aten.native_layer_norm(x, [d], w, b, 1e-5) for x in xs]
    ours = torch.ops.lightning_cbwc.rms_norm_backward.default
    aten = torch.ops.aten.native_layer_norm_backward.default
    print(f"{rows}x{d} fp32, {a.inputs} inputs per round, {a.threads} threads, {a.rounds} rounds")
    for mask in ([True, True, True], [True, False, False]):

        def run_aten(mask=mask) -> None:
            for x, g, (_, mean, rstd) in zip(xs, gs, stats, strict=True):
                aten(g, x, [d], mean, rstd, w, b, mask)

        def run_ours(mask=mask) -> None:
            for x, g in zip(xs, gs, strict=True):
                ours(g, x, [d], w, 1e-5, mask, True)

        times = interleaved({"aten": run_aten, "ours": run_ours}, a.rounds, warmup=2)
        r = paired_ratio(times, "ours", "aten")
        name = "dx, dw, db" if all(mask) else "dx only"
        print(
            f"   {name:10s}: ATen LayerNorm {min(times['aten']) * 1e3 / a.inputs:.2f} ms, ours "
            f"{min(times['ours']) * 1e3 / a.inputs:.2f} ms per call; ours / ATen {r[0]:.2f} [{r[1]:.2f}, {r[2]:.2f}]"
        )


if __name__ == "__main__":
    main()
