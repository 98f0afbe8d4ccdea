"""How long the zero-mean analysis takes on a 12-layer GPT-2 small: capture (torch.export) and analysis.

    python benchmarks/bench_analysis.py [--repeats 3] [--seq 128]

HF ``GPT2Config()`` defaults (124M parameters, random init, nothing downloaded), ``use_cache=False``, input
ids of shape (1, seq).  Prints the median of ``--repeats`` runs of each phase; the target for the whole is
< 30 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_cbwc.analysis import analyze_captured, capture


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args(argv)

    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = GPT2LMHeadModel(GPT2Config(n_layer=args.layers, use_cache=False)).eval()
    build_s = time.perf_counter() - t0
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq))
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"GPT-2 small: {args.layers} layers, {n_params:.0f}M parameters (built in {build_s:.1f} s), "
        f"input ids (1, {args.seq}), torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    captures, analyses, nodes, plan = [], [], 0, None
    for i in range(args.repeats):
        t0 = time.perf_counter()
        cap = capture(model, (ids,))
        t1 = time.perf_counter()
        plan = analyze_captured(cap)
        t2 = time.perf_counter()
        captures.append(t1 - t0)
        analyses.append(t2 - t1)
        nodes = len(cap.graph.nodes)
        print(f"  run {i + 1}: capture {t1 - t0:6.2f} s   analysis {t2 - t1:6.2f} s")

    cap_s, ana_s = statistics.median(captures), statistics.median(analyses)
    total = cap_s + ana_s
    print(f"graph: {nodes} nodes; plan: {plan.summary()}")
    print(f"median of {args.repeats}: capture {cap_s:.2f} s, analysis {ana_s:.2f} s, total {total:.2f} s")
    print(f"target < 30 s: {'met' if total < 30 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
