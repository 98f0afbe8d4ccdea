"""Training step of CBWC vs LayerNorm vs plain RMSNorm (CPU), side by side.

Variants, each its own copy of the same model with its own AdamW, measured interleaved (round-robin, the
order rotated every round) so that load drifts on a shared machine hit every variant alike:

* ``ln``            the LayerNorm model as is;
* ``rms``           plain RMSNorm: every LayerNorm swapped, no centering (what people pick instead of LN);
* ``parametrize``   CBWC (the default): ``convert`` + ``attach``; W = V - mean(V) in every forward over the
                    LayerNorm model's own weights, foldable sites only;
* ``all``           CBWC with ``replace="all"``: every LayerNorm swapped, the approximate ones too;
* ``project``       (opt-in) ``convert(mode="project")``: weights re-centered after every optimizer step
                    (gradients are zero-mean by construction: the swapped norms compute LayerNorm's backward).

In every CBWC variant the trainable tables are centered at the lookup.

A step is zero_grad + forward + loss + backward + AdamW step.  Reported per variant: median step time and the
paired per-round ratio to ``ln`` with its 95% interval (lightning_cbwc.timing), plus the projection alone
(gradient + weight centering of all writers) timed in isolation, as a fraction of the ``rms`` step.

Models: ``vit`` (ViT-S/16 224, batch 8), ``gpt2`` (GPT-2 small), and the recipe models at their recipe sizes
read from configs/*_cbwc.yaml: ``recipe_gpt`` (char GPT-2), ``recipe_vit`` (Fashion-MNIST ViT),
``recipe_digits`` (the ViT fine-tuned on digits), ``recipe_minilm`` (MiniLM fine-tuned on play genres),
``recipe_convnext`` (the Fashion-MNIST ConvNeXt: 16-128 wide norms, where exactness is partially broken).
Sweeps (``--sweep seq`` / ``--sweep img``): a GPT-2-shaped 4 x 768 model (byte vocabulary), batch 1, sequence
128 -> 2048, and ViT-S at growing image size; ``--plot`` draws the ratio to ``ln`` against the length.

    python benchmarks/bench_training.py --models recipe_gpt,recipe_vit,recipe_digits,recipe_minilm,vit
    python benchmarks/bench_training.py --sweep seq --plot benchmarks/results/training_seq.svg
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

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_cbwc import attach, convert  # noqa: E402
from lightning_cbwc.norm.functional import kernel_status  # noqa: E402
from lightning_cbwc.surgery import swap_every_norm  # noqa: E402
from lightning_cbwc.timing import interleaved, paired_ratio, verdict  # noqa: E402
from lightning_cbwc.training.projection import project_, project_grads_, projection_targets  # noqa: E402

VARIANTS = ("ln", "rms", "parametrize", "all")


def _classify(model: nn.Module, x: torch.Tensor, classes: int):
    y = torch.randint(0, classes, (x.shape[0],))

    def loss(m):
        return nn.functional.cross_entropy(m(x), y)

    return model, (x,), {}, loss


def vit(batch: int, img: int):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=img, num_classes=100)
    return (
        *_classify(model, torch.randn(batch, 3, img, img), 100),
        f"timm ViT-S/16, img {img}, batch {batch}",
    )


def _lm(model: nn.Module, vocab: int, batch: int, seq: int, desc: str):
    ids = torch.randint(0, vocab, (batch, seq))

    def loss(m):
        return m(ids, labels=ids, use_cache=False).loss

    return model, (ids,), {"use_cache": False}, loss, desc


def gpt2(batch: int, seq: int):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # GPT-2 small (124M)
    model = transformers.GPT2LMHeadModel(cfg)
    return _lm(model, cfg.vocab_size, batch, seq, f"GPT-2 small (124M), batch {batch} x seq {seq}")


def small_gpt2(batch: int = 8, seq: int = 64):
    """A 4 x 128 char GPT-2 at batch 8 x 64 (the earlier table's small model)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=96, n_positions=seq, n_embd=128, n_layer=4, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg)
    return _lm(model, 96, batch, seq, f"char GPT-2 4 x 128, batch {batch} x seq {seq}")


def gpt2_shaped(seq: int, layers: int = 4, width: int = 768, batch: int = 1):
    """GPT-2 blocks at GPT-2 small's width, a byte vocabulary (the 50k-word head would dominate the step)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=256, n_positions=seq, n_embd=width, n_layer=layers, n_head=width // 64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg)
    return _lm(model, 256, batch, seq, f"GPT-2 {layers} x {width}, byte vocab, batch {batch} x seq {seq}")


def _config(name: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())


def recipe_gpt():
    from recipes.text_generation import CharGPT

    cfg = _config("text_generation_cbwc")
    block, batch = cfg["data"]["block_size"], cfg["data"]["batch_size"]
    torch.manual_seed(0)
    lit = CharGPT(vocab="".join(chr(32 + i) for i in range(65)), block_size=block, **cfg["model"])
    ids = torch.randint(0, 65, (batch, block + 1))

    def loss(m):
        logits = m(ids[:, :-1])
        return nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    m = cfg["model"]
    desc = f"recipe char GPT-2 {m['n_layer']} x {m['n_embd']}, batch {batch} x seq {block}"
    return lit.net, (ids[:, :-1],), {}, loss, desc


def _recipe_vit(config: str, desc: str):
    from recipes.image_classification import create_vit

    cfg = _config(config)
    model_cfg = cfg["model"].get("init_args", cfg["model"])
    arch = _config("image_classification_cbwc")["model"]  # the fine-tuned ViT has the classifier's shape
    arch = {k: v for k, v in arch.items() if k not in ("lr", "weight_decay", "warmup_steps")}
    arch["num_classes"] = model_cfg.get("num_classes", arch["num_classes"])
    batch = cfg["data"].get("init_args", cfg["data"])["batch_size"]
    torch.manual_seed(0)
    x = torch.randn(batch, arch["in_chans"], arch["img_size"], arch["img_size"])
    model = create_vit(**arch)
    return (*_classify(model, x, arch["num_classes"]), f"{desc}, batch {batch}")


def recipe_convnext():
    from recipes.image_convnext import create_convnext

    cfg = _config("image_convnext_cbwc")
    arch = {
        k: v for k, v in cfg["model"].items() if k not in ("lr", "weight_decay", "warmup_steps", "img_size")
    }
    size, batch = cfg["model"]["img_size"], cfg["data"]["batch_size"]
    torch.manual_seed(0)
    x = torch.randn(batch, arch["in_chans"], size, size)
    model = create_convnext(**arch)
    dims = "/".join(str(d) for d in arch["dims"])
    return (*_classify(model, x, arch["num_classes"]), f"recipe Fashion-MNIST ConvNeXt {dims}, batch {batch}")


def recipe_minilm():
    from recipes.finetune import MiniLMClassifier

    cfg = _config("finetune_minilm_genre_cbwc")
    init = cfg["model"]["init_args"]
    batch, length = cfg["data"]["init_args"]["batch_size"], init["max_length"]
    torch.manual_seed(0)
    net = MiniLMClassifier(num_classes=init["num_classes"], max_length=length, lora_r=0).net.train()
    ids = torch.randint(1000, 20000, (batch, length))
    mask = torch.ones_like(ids)
    y = torch.randint(0, init["num_classes"], (batch,))

    def loss(m):
        return nn.functional.cross_entropy(m(ids, mask), y)

    return (
        net,
        (ids, mask),
        {},
        loss,
        f"recipe MiniLM-L6 (post-LN) full fine-tuning, batch {batch} x {length}",
    )


def build(variant: str, base: nn.Module, args, kwargs):
    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if variant == "rms":
            swap_every_norm(model)
        elif variant in ("project", "parametrize"):
            convert(model.train(), args, kwargs, mode=variant)
        elif variant == "all":
            convert(model.train(), args, kwargs, replace="all")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    if variant in ("project", "parametrize", "all"):
        attach(opt, model)
    return model, opt


CLOCK = time.perf_counter


def step(model, opt, loss_fn) -> float:
    t0 = CLOCK()
    opt.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    opt.step()
    return CLOCK() - t0


def projection_cost(model: nn.Module, reps: int = 20) -> tuple[float, float]:
    """(min, median) seconds of what attach() runs per step: project_ over every target, and project_grads_
    over those whose gradient is not zero-mean by construction (grads present)."""
    targets = projection_targets(model)
    grad_targets = [t for t in targets if not t.zero_mean_grad]
    for t in targets:
        if t.tensor.requires_grad and t.tensor.grad is None:
            t.tensor.grad = torch.randn_like(t.tensor)
    times = []
    for _ in range(reps):
        t0 = CLOCK()
        project_grads_(grad_targets)
        project_(targets)
        times.append(CLOCK() - t0)
    return min(times), statistics.median(times)


def norm_inputs(model: nn.Module, args, kwargs) -> list[tuple[nn.Module, torch.Size]]:
    """(norm module, input shape) of every LayerNorm / RMSNorm call of one forward."""
    from lightning_cbwc.norm import RMSNorm

    calls = []
    handles = [
        m.register_forward_pre_hook(lambda m, a: calls.append((m, a[0].shape)))
        for m in model.modules()
        if isinstance(m, nn.LayerNorm | RMSNorm)
    ]
    with torch.no_grad():
        model(*args, **kwargs)
    for h in handles:
        h.remove()
    return calls


def _fwd_bwd(calls: list[tuple[nn.Module, torch.Size]]):
    data = [(m, torch.randn(shape, requires_grad=True), torch.randn(shape)) for m, shape in calls]

    def run() -> None:
        for m, x, g in data:
            x.grad = None  # as in a step, the input's gradient goes on (is not added into a held .grad)
            m(x).backward(g)

    return run


def _output_centered(model: nn.Module, args, kwargs) -> dict[nn.Module, torch.Size]:
    """The parametrized writers that center their output in one forward (fewer rows than inputs), with the
    output's shape: their cost is that subtraction, not their weight's."""
    from lightning_cbwc.training.parametrize import _PASSING

    seen: dict[nn.Module, torch.Size] = {}
    passing: set[nn.Module] = set()

    def pre(m, a) -> None:  # runs after the writer's own pre-hook has chosen
        if _PASSING in m.__dict__:
            passing.add(m)

    def post(m, a, out) -> None:
        if m in passing:
            seen[m] = out.shape

    mods = [m for m in model.modules() if hasattr(m, "parametrizations")]
    handles = [h for m in mods for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    with torch.no_grad():
        model(*args, **kwargs)
    for h in handles:
        h.remove()
    return seen


def _centering(model: nn.Module, args, kwargs):
    """Every Centering of ``model`` as one step runs it, forward and backward: W = V - mean V, or the output's
    centering for the writers that center their output at this batch size."""
    from torch.nn.utils import parametrize as P

    from lightning_cbwc.centering import subtract_mean

    outputs = _output_centered(model, args, kwargs)
    owners = [
        (m, name)
        for m in model.modules()
        if P.is_parametrized(m) and m not in outputs
        for name in m.parametrizations
    ]
    originals = [getattr(m.parametrizations, name).original for m, name in owners]
    grads = [torch.ones_like(v) for v in originals]
    ys = [
        (
            torch.randn(shape, requires_grad=True),
            torch.randn(shape),
            m.parametrizations.weight[0].zero_mean_grad,
        )
        for m, shape in outputs.items()
    ]

    def run() -> None:
        # autograd.grad, not backward: accumulating into .grad would clone the held-on-to incoming gradient,
        # a copy a step does not make (it steals the fresh gradient of the matmul's backward)
        if owners:
            ws = [getattr(m, name) for m, name in owners]
            torch.autograd.grad(ws, originals, grads)
        for y, g, zero_mean_grad in ys:
            torch.autograd.grad(subtract_mean(y, y.dim() - 1, zero_mean_grad), y, g)

    return run, len(owners) + len(ys)


def centering_micro(rounds: int = 60) -> None:
    """``centering.subtract_mean`` (one autograd Function from 2^18 values on) against the composite
    ``V - V.mean(0)``, forward + backward, at writer shapes: where the Function's saved pass pays."""
    from lightning_cbwc.centering import _SubtractMean

    for shape in [(96, 96), (384, 384), (512, 512), (384, 1536), (768, 3072)]:
        v = torch.randn(shape, requires_grad=True)
        g = torch.ones(shape)

        def composite(v=v, g=g) -> None:
            (v - v.mean(dim=0, keepdim=True)).backward(g)

        def function(v=v, g=g) -> None:
            _SubtractMean.apply(v, 0).backward(g)

        times = interleaved({"composite": composite, "function": function}, rounds, warmup=5, block=5)
        r = paired_ratio(times, "function", "composite")
        print(
            f"   {shape[0]} x {shape[1]} ({v.numel()} values): composite {min(times['composite']) * 1e6:.0f} us, "
            f"Function {min(times['function']) * 1e6:.0f} us, ratio {r[0]:.2f} [{r[1]:.2f}, {r[2]:.2f}]"
        )


def projection_micro(name: str, factory, rounds: int = 30) -> None:
    """The weight re-centering ``attach`` runs after each step, over the model's ``project``-mode targets: in
    one C++ call (``project_``) against one ``fast_center_`` per tensor, interleaved."""
    from lightning_cbwc.centering import fast_center_

    base, args, kwargs, _, desc = factory()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(base.train(), args, kwargs, mode="project")
    targets = [t for t in projection_targets(base) if t.tensor.requires_grad]
    values = sum(t.tensor.numel() for t in targets)
    if not targets:
        print(f"   {name} ({desc}): no projected writer, nothing to re-center", flush=True)
        return

    def per_tensor() -> None:
        for t in targets:
            fast_center_(t.tensor, t.dim, t.scale)

    times = interleaved(
        {"one call": lambda: project_(targets), "per tensor": per_tensor}, rounds, warmup=3, block=3
    )
    r = paired_ratio(times, "one call", "per tensor")
    print(
        f"   {name} ({desc}; {len(targets)} tensors, {values / 1e6:.1f}M values): one call "
        f"{min(times['one call']) * 1e3:.2f} ms, per tensor {min(times['per tensor']) * 1e3:.2f} ms, "
        f"ratio {r[0]:.2f} [{r[1]:.2f}, {r[2]:.2f}]",
        flush=True,
    )


def components(runs: dict, args, kwargs, rounds: int = 30) -> dict[str, float]:
    """Milliseconds per step of the parts CBWC changes, each timed alone (min over rounds, interleaved):
    the norms at the model's own input shapes (LayerNorm vs the swapped RMSNorm, forward + backward) and the
    centering of every parametrized writer (forward + backward).  Far less noisy than a step-time ratio."""
    ln_calls = norm_inputs(runs["ln"][0], args, kwargs)
    fns = {"ln_norms": _fwd_bwd(ln_calls)}
    if "parametrize" in runs:
        fns["rms_norms"] = _fwd_bwd(norm_inputs(runs["parametrize"][0], args, kwargs))
        fns["centering"], _ = _centering(runs["parametrize"][0], args, kwargs)
    times = interleaved(fns, rounds, warmup=2, block=3)
    return {k: min(v) * 1e3 for k, v in times.items()}


def bench(name: str, factory, variants: tuple[str, ...], rounds: int, steps: int, warmup: int) -> dict:
    base, args, kwargs, loss_fn, desc = factory()
    print(f"\n== {name}: {desc}", flush=True)
    runs = {v: build(v, base, args, kwargs) for v in variants}
    print(f"   {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params", flush=True)
    del base
    times = interleaved(
        {v: (lambda v=v: step(*runs[v], loss_fn)) for v in variants}, rounds, warmup=warmup, block=steps
    )
    med = {v: statistics.median(times[v]) for v in variants}
    ratios = {v: paired_ratio(times, v, "ln") for v in variants}
    print(f"   {'variant':<12} {'median ms':>10} {'ratio to ln [95% interval]':>32}  verdict")
    for v in variants:
        r = ratios[v]
        print(f"   {v:<12} {med[v] * 1e3:>10.1f} {r[0]:>12.3f} [{r[1]:.3f}, {r[2]:.3f}]        {verdict(r)}")
    for a, b in (("parametrize", "rms"), ("all", "rms"), ("parametrize", "project")):
        if a in variants and b in variants:
            r = paired_ratio(times, a, b)
            print(f"   {a} / {b}: {r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}] ({verdict(r)})")
    parts = components(runs, args, kwargs)
    if "rms_norms" in parts:
        net = parts["rms_norms"] + parts["centering"] - parts["ln_norms"]
        print(
            f"   parts alone (min ms per step): LayerNorms {parts['ln_norms']:.2f}, the swapped norms "
            f"{parts['rms_norms']:.2f}, centering {parts['centering']:.2f}: CBWC changes the step by "
            f"{net:+.2f} ms = {net / med['ln'] / 1e3 * 100:+.2f}% of the ln step",
            flush=True,
        )
    if "project" in variants:
        proj_min, proj = projection_cost(runs["project"][0])
        parts["projection"] = proj_min * 1e3
        print(
            f"   projection alone (grad + weight centering): min {proj_min * 1e3:.2f} ms, median "
            f"{proj * 1e3:.2f} ms per step = {proj / med['ln'] * 100:.2f}% of the ln step",
            flush=True,
        )
    sys.stdout.flush()
    return {
        "desc": desc,
        "median_ms": {v: t * 1e3 for v, t in med.items()},
        "ratio_to_ln": ratios,
        "parts_ms": parts,
    }


def plot(results: dict[str, dict], path: str, xlabel: str) -> None:
    """Step-time ratio to ``ln`` (with its 95% interval) against the sweep's length, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [int(k) for k in results]
    fig, axis = plt.subplots(figsize=(6, 3.6))
    for v in next(iter(results.values()))["ratio_to_ln"]:
        if v == "ln":
            continue
        r = [results[str(x)]["ratio_to_ln"][v] for x in xs]
        mid = [m for m, _, _ in r]
        axis.errorbar(
            xs, mid, yerr=[[m - lo for m, lo, _ in r], [hi - m for m, _, hi in r]], label=v, capsize=3
        )
    parts = [results[str(x)].get("parts_ms", {}) for x in xs]
    # the parts timed alone: far less noise than the step ratios
    for part, style, mode in (("centering", "k--o", "parametrize"), ("projection", "k:s", "project")):
        if all(part in q for q in parts):
            est = [
                1 + (q["rms_norms"] + q[part] - q["ln_norms"]) / results[str(x)]["median_ms"]["ln"]
                for x, q in zip(xs, parts, strict=True)
            ]
            axis.plot(xs, est, style, label=f"{mode}, from the parts timed alone")
    axis.axhline(1.0, color="gray", lw=0.8)
    axis.set_xscale("log", base=2)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("step time / LayerNorm's")
    axis.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vit,recipe_gpt,recipe_vit")
    p.add_argument("--variants", default=",".join(VARIANTS), help="ln is always measured (the ratios' base)")
    p.add_argument("--sweep", choices=("seq", "img"), help="a length sweep instead of --models")
    p.add_argument("--lengths", default="", help="sweep points (default seq 128..2048, img 112..448)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument(
        "--steps", type=int, default=2, help="steps per variant per round (all but the first timed)"
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--vit-batch", type=int, default=8)
    p.add_argument("--vit-img", type=int, default=224)
    p.add_argument("--gpt-batch", type=int, default=4)
    p.add_argument("--gpt-seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--json", help="write the results there")
    p.add_argument("--plot", help="(with --sweep) draw the ratios there (.svg / .png)")
    p.add_argument("--centering-micro", action="store_true", help="only time subtract_mean's two forms")
    p.add_argument(
        "--projection-micro", action="store_true", help="only time the weight re-centering of --models"
    )
    p.add_argument("--from-json", help="with --plot: draw the sweep written by --json, measure nothing")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: process CPU time (with --threads 1: the work itself, robust on a shared, loaded machine)",
    )
    a = p.parse_args()
    global CLOCK
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.clock == "cpu":
        CLOCK = time.process_time
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.clock} clock; RMSNorm: {kernel_status()}"
    )
    if a.from_json:  # redraw a finished sweep
        plot(
            json.loads(Path(a.from_json).read_text()),
            a.plot,
            "sequence length" if a.sweep != "img" else "image size",
        )
        return
    if a.centering_micro:
        centering_micro()
        return
    variants = tuple(dict.fromkeys(["ln", *a.variants.split(",")]))
    if a.sweep == "seq":
        points = [int(x) for x in a.lengths.split(",")] if a.lengths else [128, 256, 512, 1024, 2048]
        factories = {str(n): (lambda n=n: gpt2_shaped(n)) for n in points}
    elif a.sweep == "img":
        points = [int(x) for x in a.lengths.split(",")] if a.lengths else [112, 224, 320, 448]
        factories = {str(n): (lambda n=n: vit(1, n)) for n in points}
    else:
        factories = {
            "vit": lambda: vit(a.vit_batch, a.vit_img),
            "gpt2": lambda: gpt2(a.gpt_batch, a.gpt_seq),
            "small": small_gpt2,
            "recipe_gpt": recipe_gpt,
            "recipe_vit": lambda: _recipe_vit("image_classification_cbwc", "recipe Fashion-MNIST ViT"),
            "recipe_digits": lambda: _recipe_vit("finetune_vit_digits_cbwc", "recipe digits fine-tuning ViT"),
            "recipe_minilm": recipe_minilm,
            "recipe_convnext": recipe_convnext,
        }
        factories = {name: factories[name] for name in a.models.split(",")}
    if a.projection_micro:
        for name, f in factories.items():
            projection_micro(name, f)
        return
    results = {name: bench(name, f, variants, a.rounds, a.steps, a.warmup) for name, f in factories.items()}
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    if a.plot and a.sweep:
        plot(results, a.plot, "sequence length" if a.sweep == "seq" else "image size (pixels)")


if __name__ == "__main__":
    main()
