"""Training-step overhead of CBWC's two modes vs plain LayerNorm training (CPU).

Variants, each its own copy of the same model with its own AdamW, measured interleaved (round-robin, the
order rotated every round) so that load drifts on a shared machine hit every variant alike:

* ``ln``            the LayerNorm model as is;
* ``rms``           the foldable LayerNorms swapped for RMSNorm, writers NOT centered (the cost of the swap
                    alone: what the norm kernel costs or saves);
* ``project``       ``convert(mode="project")`` + ``attach``: gradients centered as they accumulate, weights
                    re-centered after every optimizer step;
* ``parametrize``   ``convert(mode="parametrize")`` + ``attach``: W = V - mean(V) in every forward over the
                    LayerNorm model's own weights (tables centered at the lookup).

A step is zero_grad + forward + loss + backward + AdamW step.  Reported per variant: median step time and the
paired per-round ratio to ``ln`` with its 95% interval (lightning_cbwc.timing), plus the projection alone
(gradient + weight centering of all project-mode writers) timed in isolation, as a fraction of the ``rms``
step: that number has far less noise than a difference of two noisy medians.

    python benchmarks/bench_training.py                       # ViT-S/16 224 batch 8, GPT-2 small 4x128
    python benchmarks/bench_training.py --models small --rounds 12   # a 4 x 128 char GPT-2 (recipe-sized)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from torch import nn

from lightning_cbwc import attach, convert
from lightning_cbwc.analysis import analyze
from lightning_cbwc.norm.functional import kernel_status
from lightning_cbwc.surgery import swap_norms
from lightning_cbwc.timing import interleaved, paired_ratio, verdict
from lightning_cbwc.training.projection import project_, project_grads_, projection_targets

VARIANTS = ("ln", "rms", "project", "parametrize")


def vit(batch: int, img: int):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=img, num_classes=100)
    x = torch.randn(batch, 3, img, img)
    y = torch.randint(0, 100, (batch,))

    def loss(m):
        return nn.functional.cross_entropy(m(x), y)

    return model, (x,), {}, loss, f"timm vit_small_patch16_224, img {img}, batch {batch}"


def gpt2(batch: int, seq: int):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # GPT-2 small (124M)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))

    def loss(m):
        return m(ids, labels=ids, use_cache=False).loss

    return model, (ids,), {"use_cache": False}, loss, f"GPT-2 small (124M), batch {batch} x seq {seq}"


def small_gpt2(batch: int, seq: int):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=96,
        n_positions=seq,
        n_embd=128,
        n_layer=4,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))

    def loss(m):
        return m(ids, labels=ids, use_cache=False).loss

    return model, (ids,), {"use_cache": False}, loss, f"char GPT-2 4 x 128, batch {batch} x seq {seq}"


def build(variant: str, base: nn.Module, args, kwargs):
    model = copy.deepcopy(base)
    if variant == "rms":
        swap_norms(model, analyze(model, args, kwargs))
    elif variant in ("project", "parametrize"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert(model, args, kwargs, mode=variant)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    if variant in ("project", "parametrize"):
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
    """(min, median) seconds of project_grads_ + project_ over every target (grads present)."""
    targets = projection_targets(model)
    for t in targets:
        if t.tensor.requires_grad and t.tensor.grad is None:
            t.tensor.grad = torch.randn_like(t.tensor)
    times = []
    for _ in range(reps):
        t0 = CLOCK()
        project_grads_(targets)
        project_(targets)
        times.append(CLOCK() - t0)
    return min(times), statistics.median(times)


def bench(name: str, factory, rounds: int, steps: int, warmup: int) -> dict:
    base, args, kwargs, loss_fn, desc = factory()
    print(f"\n== {name}: {desc}", flush=True)
    runs = {v: build(v, base, args, kwargs) for v in VARIANTS}
    del base
    nparams = {v: sum(p.numel() for p in runs[v][0].parameters()) for v in VARIANTS}
    targets = projection_targets(runs["project"][0])
    print(
        f"   {nparams['ln'] / 1e6:.1f}M params; project mode keeps {len(targets)} tensors "
        f"({sum(t.tensor.numel() for t in targets) / 1e6:.1f}M values) centered",
        flush=True,
    )
    times = interleaved(
        {v: (lambda v=v: step(*runs[v], loss_fn)) for v in VARIANTS}, rounds, warmup=warmup, block=steps
    )
    med = {v: statistics.median(times[v]) for v in VARIANTS}
    low = {v: min(times[v]) for v in VARIANTS}
    proj_min, proj = projection_cost(runs["project"][0])
    print(f"   {'variant':<12} {'median ms':>10} {'ratio to ln [95% interval]':>32}  verdict")
    for v in VARIANTS:
        r = paired_ratio(times, v, "ln")
        print(f"   {v:<12} {med[v] * 1e3:>10.1f} {r[0]:>12.3f} [{r[1]:.3f}, {r[2]:.3f}]        {verdict(r)}")
    r = paired_ratio(times, "parametrize", "project")
    print(f"   parametrize / project: {r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}] ({verdict(r)})")
    print(
        f"   projection alone (grad + weight centering, {len(targets)} tensors): min {proj_min * 1e3:.2f} ms, "
        f"median {proj * 1e3:.2f} ms per step = {proj_min / low['rms'] * 100:.2f}% (min/min) / "
        f"{proj / med['rms'] * 100:.2f}% (median/median) of the rms step",
        flush=True,
    )
    return {"median": med, "min": low, "projection": (proj_min, proj)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vit,gpt2")
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
    factories = {
        "vit": lambda: vit(a.vit_batch, a.vit_img),
        "gpt2": lambda: gpt2(a.gpt_batch, a.gpt_seq),
        "small": lambda: small_gpt2(8, 64),
    }
    for name in a.models.split(","):
        bench(name, factories[name], a.rounds, a.steps, a.warmup)


if __name__ == "__main__":
    main()
