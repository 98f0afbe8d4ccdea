"""Token-by-token generation with the KV cache: LayerNorm original vs folded vs folded + fuse_affine vs no norm.

    python benchmarks/bench_generate.py [--models gpt2,opt] [--batches 1,8] [--prompts 32,128]
        [--new-tokens 64] [--dtypes fp32,bf16] [--modes eager,compile] [--rounds 6] [--device cpu|cuda]

HF GPT-2 small and an OPT-125m-shaped model (random init from a local config, nothing downloaded).  Each
round runs every variant's prefill (one forward on the prompt) and then the greedy decoding loop that
``generate()`` runs (one forward per token on the KV cache), the variants interleaved at every step in an
order rotated per step: a per-token ratio is the median of (variant / original) over all steps of all
rounds, each pair timed milliseconds apart, with a 95% interval (lightning_cbwc/timing.py).  "bound"
replaces every LayerNorm by identity (its tokens differ: it is a cost floor, not a model); "copy" is a second copy of the original, whose ratio
shows how far two identical models measure apart here (memory placement of the 150 MB embedding the
LM head reads every token).  The tokens are
also generated with ``generate()`` itself, as users call it.

The folded models' tokens must equal the original's in float32: the script exits non-zero otherwise.  In
bf16 all variants round differently, so each one's tokens are compared with the float64 model's instead
(agreeing prefix, printed).  ``--modes compile`` wraps ``model.forward`` in ``torch.compile`` and generates
with HF's static cache (a dynamic cache recompiles as it grows); its per-token time is (64-token generate -
1-token generate) / 63, paired per round.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_e2e import no_norm  # noqa: E402

import lightning_cbwc as lc  # noqa: E402
from lightning_cbwc.norm import kernel_status  # noqa: E402
from lightning_cbwc.timing import interleaved, median_ci, paired_ratio, verdict  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VARIANTS = ("original", "folded", "folded+fused", "bound", "copy")


def build(name: str, small: bool = False) -> nn.Module:
    """A randomly initialised causal LM from a local config (``small``: a 2-layer x 64 test size)."""
    import transformers

    if name == "gpt2":
        kw = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 1000} if small else {}
        eos = 999 if small else 50256
        cfg = transformers.GPT2Config(**kw, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
        return transformers.GPT2LMHeadModel(cfg).eval()
    if name == "opt":  # facebook/opt-125m's shape
        size = {"hidden_size": 64, "ffn_dim": 256, "num_hidden_layers": 2, "num_attention_heads": 4}
        size = size if small else {"hidden_size": 768, "ffn_dim": 3072, "num_hidden_layers": 12}
        cfg = transformers.OPTConfig(
            **size,
            word_embed_proj_dim=size["hidden_size"],
            vocab_size=1000 if small else 50272,
            max_position_embeddings=2048,
        )
        return transformers.OPTForCausalLM(cfg).eval()
    raise SystemExit(f"unknown model {name!r}: use gpt2 or opt")


def variants(base: nn.Module, prompt: torch.Tensor) -> dict[str, nn.Module]:
    """original, folded, folded + fuse_affine and the no-norm bound of ``base`` (float32, eval)."""
    no_cache = {"use_cache": False}  # the analysis captures one forward; generation then uses the cache
    return {
        "original": base,
        "folded": lc.fold(base, (prompt,), no_cache),
        "folded+fused": lc.fold(base, (prompt,), no_cache, fuse_affine=True),
        "bound": no_norm(base),
        "copy": copy.deepcopy(base),  # the original again: an A/A control, the noise floor of the ratios
    }


def generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int, static: bool = False) -> torch.Tensor:
    """Greedy generation of exactly ``new_tokens`` tokens with the KV cache (eos ignored).

    ``static``: HF's static cache, the one ``torch.compile`` can run without recompiling as the cache grows.
    """
    pad = model.generation_config.pad_token_id
    pad = model.config.eos_token_id if pad is None else pad
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=pad,
        **({"cache_implementation": "static"} if static else {}),
    )


def compiled_times(cast: dict[str, nn.Module], prompt, new_tokens: int, rounds: int, sync):
    """``torch.compile`` mode: ``generate()`` with the static cache, a 1-token run (prefill) and a full run per
    variant per round, interleaved (rotated); per-token = (full - prefill) / (new_tokens - 1) per round."""
    fns = {}
    for k, m in cast.items():
        fns[f"{k}:prefill"] = lambda m=m: generate(m, prompt, 1, static=True)
        fns[f"{k}:full"] = lambda m=m: generate(m, prompt, new_tokens, static=True)
    times = interleaved(fns, rounds, warmup=2, sync=sync)
    prefill = {k: times[f"{k}:prefill"] for k in cast}
    per_token = {
        k: [(f - p) / (new_tokens - 1) for f, p in zip(times[f"{k}:full"], prefill[k], strict=True)]
        for k in cast
    }
    return prefill, per_token


def agreeing_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Tokens from the start on which every row of ``a`` and ``b`` agree."""
    same = (a == b).all(dim=0)
    return int(same.long().cumprod(0).sum())


def cache_arg(model: nn.Module) -> str:
    """The forward's KV-cache argument: ``cache`` in newer transformers, ``past_key_values`` before."""
    forward = getattr(model.forward, "__wrapped__", model.forward)  # under torch.compile: the original
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def decode_times(cast: dict[str, nn.Module], prompt, new_tokens: int, round_no: int, sync) -> dict[str, list]:
    """One round: prefill every variant, then decode token by token with the variants interleaved.

    Step t runs each variant's forward on its own next token and KV cache, in an order rotated by t and the
    round, so a pair (variant, original) at one step ran milliseconds apart.  Returns seconds per call:
    ``{variant: [prefill, step 1, ..., step new_tokens - 1]}``.
    """
    names = list(cast)
    state, times = {}, {k: [] for k in names}
    for t in range(new_tokens):
        k0 = (t + round_no) % len(names)
        for name in names[k0:] + names[:k0]:
            m = cast[name]
            t0 = time.perf_counter()
            if t == 0:
                out = m(prompt, attention_mask=torch.ones_like(prompt), use_cache=True)
            else:
                ids, cache, mask = state[name]
                out = m(ids, attention_mask=mask, use_cache=True, **{cache_arg(m): cache})
            if sync:
                sync()
            times[name].append(time.perf_counter() - t0)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.ones(
                prompt.shape[0], prompt.shape[1] + t + 1, dtype=prompt.dtype, device=prompt.device
            )
            state[name] = (nxt, out["cache"] if "cache" in out else out.past_key_values, mask)
    return times


def placed(models: dict[str, nn.Module], device, dtype, mode: str) -> dict[str, nn.Module]:
    """Fresh copies of the variants on ``device`` in ``dtype`` (compiled with ``mode == "compile"``)."""
    cast = {k: copy.deepcopy(m).to(device, dtype) for k, m in models.items()}
    if mode == "compile":
        for m in cast.values():
            m.forward = torch.compile(m.forward)
    return cast


def run_config(models: dict[str, nn.Module], prompt, new_tokens, dtype, mode, rounds, device, sync):
    """Times prefill and decoding for each variant; returns (row, generate()'s tokens per variant).

    In eager mode every round decodes with fresh copies of the models: where a copy's 150 MB embedding lands
    in memory moves its per-token time by 1-2% (see the "copy" control), and fresh copies average that out.
    The per-token ratio is the median over all steps; its interval comes from the per-round medians.
    """
    prompt = prompt.to(device)
    cast = placed(models, device, dtype, mode)
    prefill: dict[str, list[float]] = {k: [] for k in cast}
    per_token: dict[str, list[float]] = {k: [] for k in cast}
    round_ratio: dict[str, list[float]] = {k: [] for k in cast}
    with torch.inference_mode():
        static = mode == "compile"
        tokens = {k: generate(m, prompt, new_tokens, static).cpu() for k, m in cast.items()}
        if static:
            prefill, per_token = compiled_times(cast, prompt, new_tokens, rounds, sync)
            round_ratio = {
                k: [a / b for a, b in zip(v, per_token["original"], strict=True)]
                for k, v in per_token.items()
            }
        else:
            decode_times(cast, prompt, 4, 0, sync)  # warm-up
        for r in range(0 if static else rounds):
            if r and mode == "eager":
                cast = placed(models, device, dtype, mode)
            times = decode_times(cast, prompt, new_tokens, r, sync)
            for k, series in times.items():
                prefill[k].append(series[0])
                per_token[k].extend(series[1:])
                round_ratio[k].append(paired_ratio({k: series[1:], "o": times["original"][1:]}, k, "o")[0])
    row = {}
    for label, series in (("per_token", per_token), ("prefill", prefill)):
        row[f"{label}_ms"] = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in series.items()}
        for k in VARIANTS[1:]:
            row[f"{label}:{k}/original"] = paired_ratio(series, k, "original")
    for k in VARIANTS[1:]:
        med = row[f"per_token:{k}/original"][0]
        _, lo, hi = median_ci(round_ratio[k])
        row[f"per_token:{k}/original"] = (med, lo, hi)
    return row, tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2,opt")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompts", default="32,128")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--modes", default="eager")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument(
        "--small", action="store_true", help="2-layer x 64 models (a quick check, not a benchmark)"
    )
    ap.add_argument("--out", default="benchmarks/results/generate.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": machine,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "kernel": kernel_status(),
        "rounds": args.rounds,
        "new_tokens": args.new_tokens,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(f"torch {meta['torch']}, {meta['threads']} threads, {machine}; {meta['kernel']}")
    rows, failures = [], []
    for name in args.models.split(","):
        torch.manual_seed(0)
        base = build(name, args.small)
        for prompt_len in (int(p) for p in args.prompts.split(",")):
            for batch in (int(b) for b in args.batches.split(",")):
                gen = torch.Generator().manual_seed(prompt_len * 100 + batch)
                prompt = torch.randint(3, base.config.vocab_size, (batch, prompt_len), generator=gen)
                models = variants(base, prompt)
                with torch.inference_mode():
                    truth = generate(copy.deepcopy(base).double(), prompt, args.new_tokens)[:, prompt_len:]
                for dt in args.dtypes.split(","):
                    for mode in args.modes.split(","):
                        row, tokens = run_config(
                            models, prompt, args.new_tokens, DTYPES[dt], mode, args.rounds, device, sync
                        )
                        new = {k: t[:, prompt_len:] for k, t in tokens.items()}
                        same = {
                            k: bool(torch.equal(new[k], new["original"])) for k in ("folded", "folded+fused")
                        }
                        vs_truth = {k: agreeing_prefix(new[k], truth) for k in VARIANTS[:3]}
                        config = {
                            "model": name,
                            "batch": batch,
                            "prompt": prompt_len,
                            "dtype": dt,
                            "mode": mode,
                        }
                        rows.append(
                            {**config, **row, "tokens_equal_original": same, "prefix_vs_float64": vs_truth}
                        )
                        if dt == "fp32" and not all(same.values()):
                            failures.append(f"{config}: folded tokens differ from the original's: {same}")
                        print_row(rows[-1])
                        save(Path(args.out), meta, rows)
    for f in failures:
        print("FAILED:", f)
    return 1 if failures else 0


def print_row(row: dict) -> None:
    def cell(label, k):
        med, lo, hi = row[f"{label}:{k}/original"]
        return f"{med:.3f} [{lo:.3f}, {hi:.3f}]"

    head = f"{row['model']:5s} b{row['batch']:<2d} p{row['prompt']:<4d} {row['dtype']:4s} {row['mode']:7s}"
    ms = row["per_token_ms"]["original"]
    print(
        f"{head} per token {ms:7.2f} ms | folded {cell('per_token', 'folded')} "
        f"{verdict(row['per_token:folded/original'])} | fused {cell('per_token', 'folded+fused')} | "
        f"bound {cell('per_token', 'bound')} | copy {cell('per_token', 'copy')} || "
        f"prefill folded {cell('prefill', 'folded')} | "
        f"tokens = original {row['tokens_equal_original']}, prefix vs float64 {row['prefix_vs_float64']}",
        flush=True,
    )


def save(out: Path, meta: dict, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
