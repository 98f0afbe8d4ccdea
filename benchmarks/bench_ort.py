"""ONNX Runtime CPU latency: a LayerNorm ViT against its CBWC fold (RMSNormalization), interleaved.

    python benchmarks/bench_ort.py                          # ViT-S/16, batch 8, 224x224, 2 threads
    python benchmarks/bench_ort.py --model vit_tiny_patch16_224 --rounds 40
    python benchmarks/bench_ort.py --ops                    # the norm ops alone (LN vs RMS vs SLN)

Every variant is exported with ``lightning_cbwc.export.export(..., "onnx")`` at the same opset (23, so the
attention and GELU ops are the same in all graphs) and checked against PyTorch before it is timed:

* ``ln``: the original model (LayerNormalization);
* ``folded``: ``fold(model)``: RMSNormalization followed by an Add for each norm's beta;
* ``folded+fuse``: ``fold(model, fuse_affine=True)``: gamma/beta moved into the linears the norms feed;
* ``folded+fuse/SLN`` (``--sln``): the same graph with ORT's contrib SimplifiedLayerNormalization;
* ``no-norm (bound)`` (``--bound``): every LayerNorm removed: no fold can beat it (outputs differ).

``--profile N`` adds ORT's per-node profile (ms per run per op type), which separates the norms' share
from the rest of the model more reliably than end-to-end latency on a busy machine.

Each round runs every session once in turn (warm-up rounds first); the table gives the median and the
ratio of each median to ``ln``'s.  Random weights; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _interleaved(runs: dict[str, callable], rounds: int, warmup: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(warmup + rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return times


def _table(times: dict[str, list[float]], base: str, unit: float, unit_name: str) -> list[dict]:
    rows = []
    ref = statistics.median(times[base])
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            {
                "variant": name,
                f"median_{unit_name}": med * unit,
                f"min_{unit_name}": min(ts) * unit,
                "ratio_to_" + base: med / ref,
                "n": len(ts),
            }
        )
    return rows


def _print(rows: list[dict], unit_name: str, base: str) -> None:
    print(f"{'variant':<20} {'median ' + unit_name:>14} {'min ' + unit_name:>12} {'/ ' + base:>8}")
    for r in rows:
        print(
            f"{r['variant']:<20} {r['median_' + unit_name]:>14.3f} {r['min_' + unit_name]:>12.3f} "
            f"{r['ratio_to_' + base]:>8.3f}"
        )


def bench_model(args: argparse.Namespace) -> dict:
    import timm

    import lightning_cbwc as lc
    from lightning_cbwc.export import export

    out = Path(args.out)
    torch.manual_seed(0)
    kwargs = {"img_size": args.img} if args.img != 224 else {}
    model = timm.create_model(args.model, pretrained=False, **kwargs).eval()
    x = torch.randn(2, 3, args.img, args.img)
    variants: dict[str, Path] = {}
    errors: dict[str, float] = {}
    t0 = time.time()
    r = export(model, out / "ln", "onnx", (x,), opset=args.opset)
    variants["ln"], errors["ln"] = r.path, r.max_error
    folded = lc.fold(model, (x,))
    r = export(folded, out / "folded", "onnx", (x,), opset=args.opset)
    variants["folded"], errors["folded"] = r.path, r.max_error
    fused = lc.fold(model, (x,), fuse_affine=True)
    r = export(fused, out / "folded_fuse", "onnx", (x,), opset=args.opset)
    variants["folded+fuse"], errors["folded+fuse"] = r.path, r.max_error
    if args.sln:
        r = export(
            fused,
            out / "folded_fuse_sln",
            "onnx",
            (x,),
            opset=args.opset,
            onnx_norm_op="SimplifiedLayerNormalization",
        )
        variants["folded+fuse/SLN"], errors["folded+fuse/SLN"] = r.path, r.max_error
    if args.bound:
        bare = copy.deepcopy(model)
        for name, mod in list(bare.named_modules()):
            if isinstance(mod, torch.nn.LayerNorm):
                bare.set_submodule(name, torch.nn.Identity())
        r = export(bare, out / "no_norm", "onnx", (x,), opset=args.opset)
        variants["no-norm (bound)"], errors["no-norm (bound)"] = r.path, r.max_error
    print(f"exported and checked {len(variants)} variants in {time.time() - t0:.0f} s", file=sys.stderr)

    batch = np.random.default_rng(0).standard_normal((args.batch, 3, args.img, args.img)).astype(np.float32)
    sessions = {k: _session(p, args.threads) for k, p in variants.items()}
    outs = {k: s.run(None, {s.get_inputs()[0].name: batch})[0] for k, s in sessions.items()}
    ref = outs["ln"]
    rms = float(np.sqrt(np.mean(ref.astype(np.float64) ** 2)))
    agree = {k: float(np.abs(o - ref).max() / rms) for k, o in outs.items() if "bound" not in k}
    runs = {k: (lambda s=s: s.run(None, {s.get_inputs()[0].name: batch})) for k, s in sessions.items()}
    times = _interleaved(runs, args.rounds, args.warmup)
    rows = _table(times, "ln", 1e3, "ms")
    print(
        f"ORT {__import__('onnxruntime').__version__} CPU, {args.model} batch {args.batch} at {args.img}, "
        f"{args.threads} threads, opset {args.opset}, {args.rounds} interleaved rounds"
    )
    _print(rows, "ms", "ln")
    print("max |variant - ln| / RMS on the timed batch:", {k: f"{v:.2e}" for k, v in agree.items()})
    profile = _profile(variants, batch, args) if args.profile else None
    return {
        "profile_ms_per_run": profile,
        "model": args.model,
        "batch": args.batch,
        "img": args.img,
        "threads": args.threads,
        "opset": args.opset,
        "rounds": args.rounds,
        "rows": rows,
        "export_check_errors": errors,
        "agreement_with_ln": agree,
    }


def _profile(variants: dict[str, Path], batch: np.ndarray, args: argparse.Namespace) -> dict:
    """ORT's own per-node timings: milliseconds per run spent in each op type, for every variant."""
    import onnxruntime as ort

    result = {}
    for name, path in variants.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.log_severity_level = 3
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(args.out) / "profile")
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feed = {s.get_inputs()[0].name: batch}
        for _ in range(args.profile):
            s.run(None, feed)
        trace = Path(s.end_profiling())
        per_op: dict[str, float] = {}
        for ev in json.loads(trace.read_text()):
            if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
                op = ev.get("args", {}).get("op_name", "?")
                per_op[op] = per_op.get(op, 0.0) + ev["dur"] / 1e3 / args.profile
        trace.unlink()
        result[name] = dict(sorted(per_op.items(), key=lambda kv: -kv[1]))
    norm_ops = (
        "LayerNormalization",
        "RMSNormalization",
        "SimplifiedLayerNormalization",
        "SkipLayerNormalization",
    )
    print(f"ORT profile, ms per run ({args.profile} runs each): norm ops, Add, total of all nodes")
    for name, ops in result.items():
        norms = {k: round(v, 2) for k, v in ops.items() if k in norm_ops}
        print(f"  {name:<20} norms {norms}  Add {ops.get('Add', 0.0):.2f}  all nodes {sum(ops.values()):.1f}")
    return result


def bench_ops(args: argparse.Namespace) -> dict:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    results = {}
    for shape in args.shapes:
        n, d = (int(v) for v in shape.split("x"))
        rng = np.random.default_rng(0)
        g, b = (numpy_helper.from_array(rng.standard_normal(d).astype(np.float32), k) for k in ("g", "b"))

        def model(nodes, inits, _d=d):
            x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", _d])
            y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", _d])
            m = helper.make_model(
                helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 23)]
            )
            m.ir_version = 10
            return m.SerializeToString()

        graphs = {
            "LayerNormalization": model(
                [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-5)],
                [g, b],
            ),
            "RMSNormalization": model(
                [helper.make_node("RMSNormalization", ["x", "g"], ["y"], axis=-1, epsilon=1e-5)], [g]
            ),
            "SimplifiedLayerNorm": model(
                [helper.make_node("SimplifiedLayerNormalization", ["x", "g"], ["y"], axis=-1, epsilon=1e-5)],
                [g],
            ),
            "RMSNormalization+Add": model(
                [
                    helper.make_node("RMSNormalization", ["x", "g"], ["t"], axis=-1, epsilon=1e-5),
                    helper.make_node("Add", ["t", "b"], ["y"]),
                ],
                [g, b],
            ),
        }
        xs = rng.standard_normal((n, d)).astype(np.float32)
        runs = {}
        for name, blob in graphs.items():
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            so.log_severity_level = 3
            s = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
            bind = s.io_binding()
            bind.bind_cpu_input("x", xs)
            y = np.empty_like(xs)
            bind.bind_output("y", "cpu", 0, np.float32, list(y.shape), y.ctypes.data)
            runs[name] = lambda s=s, bind=bind, y=y: s.run_with_iobinding(bind)
        times = _interleaved(runs, args.rounds, args.warmup)
        rows = _table(times, "LayerNormalization", 1e6, "us")
        print(f"ORT CPU op {n}x{d} fp32, {args.threads} threads, {args.rounds} interleaved rounds")
        _print(rows, "us", "LayerNormalization")
        results[shape] = rows
    return {"threads": args.threads, "rounds": args.rounds, "ops": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224", help="timm model name (random weights)")
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--opset", type=int, default=23)
    p.add_argument("--sln", action="store_true", help="also time ORT's SimplifiedLayerNormalization")
    p.add_argument("--bound", action="store_true", help="also time the model with every LayerNorm removed")
    p.add_argument(
        "--profile", type=int, default=0, metavar="N", help="also profile N runs of each (ORT profiler)"
    )
    p.add_argument("--ops", action="store_true", help="time the norm ops alone instead of a model")
    p.add_argument("--shapes", nargs="+", default=["4096x768", "1576x384", "1576x192"], help="with --ops")
    p.add_argument("--out", default="out/bench_ort", help="folder for the ONNX files and results.json")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    result = bench_ops(args) if args.ops else bench_model(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "ops.json" if args.ops else f"{args.model}_b{args.batch}_{args.img}.json"
    (out / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
