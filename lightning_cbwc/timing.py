"""Side-by-side timing (benchmarks, recipes, the demo): rotated interleaving and paired ratios with a CI.

Each round runs every variant once, in an order rotated by one each round (A B C, B C A, C A B, ...), so no
variant always follows the same one (allocator and cache state carry over from the previous call).  A ratio
is the median over rounds of (variant time / base time) *within* a round: the two calls were made seconds
apart, so slow drifts of a shared machine cancel.  The 95% interval of that median comes from the order
statistics of the per-round ratios (distribution-free).  :func:`compare_latency` times whole models that way
(the recipes' and the demo's LayerNorm-vs-folded comparison).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def interleaved(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 2,
    sync: Callable[[], None] | None = None,
    block: int = 1,
) -> dict[str, list[float]]:
    """Seconds per call of each fn, per round; round r runs the variants rotated by r.

    ``block > 1`` runs each fn ``block`` times in a row per round and times all but the first call of the
    block (the median of those is the round's time): every fn then runs with its own data in cache, as a
    layer does in a model, instead of after another fn evicted it.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    if sync:
        sync()
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if block > 1:
                fns[name]()
                if sync:
                    sync()
            calls = []
            for _ in range(max(1, block - 1)):
                t0 = time.perf_counter()
                fns[name]()
                if sync:
                    sync()
                calls.append(time.perf_counter() - t0)
            times[name].append(statistics.median(calls))
    return times


def repeated(fn: Callable[[], object], calls: int) -> Callable[[], None]:
    """``fn`` called ``calls`` times in a row, as one timed unit (calls of a few microseconds each)."""

    def run() -> None:
        for _ in range(calls):
            fn()

    return run


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(median, low, high): a distribution-free interval for the median from order statistics."""
    v = sorted(values)
    n = len(v)
    if n < 6:
        return statistics.median(v), v[0], v[-1]
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    half = z * math.sqrt(n) / 2
    lo = max(0, math.floor(n / 2 - half) - 1)
    hi = min(n - 1, math.ceil(n / 2 + half))
    return statistics.median(v), v[lo], v[hi]


def paired_ratio(times: dict[str, list[float]], variant: str, base: str) -> tuple[float, float, float]:
    """Median and 95% interval of the per-round ratio variant/base."""
    return median_ci([a / b for a, b in zip(times[variant], times[base], strict=True)])


def verdict(ratio: tuple[float, float, float], limit: float = 1.0) -> str:
    """'faster' / 'slower' when the interval excludes ``limit``, else 'tie (within noise)'."""
    _, lo, hi = ratio
    if hi < limit:
        return "faster"
    if lo > limit:
        return "slower"
    return "tie (within noise)"


def batch_of(example: Any, batch: int) -> Any:
    """The example input(s) tiled along dim 0 to ``batch`` rows (a tensor, or a tuple of tensors)."""
    if isinstance(example, torch.Tensor):
        reps = math.ceil(batch / example.shape[0])
        return example.repeat(reps, *([1] * (example.dim() - 1)))[:batch].contiguous()
    if isinstance(example, tuple | list):
        return tuple(batch_of(e, batch) for e in example)
    raise TypeError(f"cannot batch an example input of type {type(example).__name__}")


@torch.inference_mode()
def compare_latency(
    models: dict[str, Callable], args: tuple, repeats: int = 20, warmup: int = 3
) -> dict[str, float]:
    """Median milliseconds per call of each model on ``args``, measured side by side.

    Rounds rotate the order (:func:`interleaved`), and each model runs 3 times in a row per round with the
    first call untimed, so no model is timed right after another one (ONNX Runtime's or OpenMP's threads
    still spinning from it, its data in the caches).
    """
    calls = {k: (lambda m=m: m(*args)) for k, m in models.items()}
    times = interleaved(calls, rounds=repeats, warmup=warmup, block=3)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}
