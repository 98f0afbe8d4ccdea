"""lightning_cbwc.timing: rotated rounds, paired ratios and their interval."""

from __future__ import annotations

import pytest
import torch

from lightning_cbwc.timing import batch_of, compare_latency, interleaved, median_ci, paired_ratio, verdict


def test_rounds_rotate_the_order():
    order: list[str] = []
    fns = {k: (lambda k=k: order.append(k)) for k in "abc"}
    interleaved(fns, rounds=3, warmup=0)
    assert order == list("abcbcacab")


def test_paired_ratio_and_verdict():
    times = {
        "base": [1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0],
        "fast": [0.9, 1.8, 0.9, 1.8, 0.9, 1.8, 0.9, 1.8],
    }
    med, lo, hi = paired_ratio(times, "fast", "base")
    assert abs(med - 0.9) < 1e-12 and lo <= med <= hi
    assert verdict((med, lo, hi)) == "faster"
    assert verdict((1.0, 0.95, 1.05)) == "tie (within noise)"
    assert verdict((1.1, 1.05, 1.2)) == "slower"


def test_median_interval_widens_with_spread():
    narrow = median_ci([1.0 + 0.001 * i for i in range(30)])
    wide = median_ci([1.0 + 0.1 * i for i in range(30)])
    assert narrow[2] - narrow[1] < wide[2] - wide[1]
    assert narrow[1] <= narrow[0] <= narrow[2]


def test_compare_latency_times_every_model_side_by_side():
    calls = {"a": 0, "b": 0}

    def model(name):
        def run(x):
            calls[name] += 1
            return x

        return run

    lat = compare_latency({"a": model("a"), "b": model("b")}, (1,), repeats=5, warmup=1)
    assert set(lat) == {"a", "b"} and all(v >= 0 for v in lat.values())
    # warm-up, then per round a block of 3 calls of which the first is not timed
    assert calls == {"a": 1 + 5 * 3, "b": 1 + 5 * 3}


def test_batch_of_tiles_examples_along_dim0():
    x = torch.arange(6.0).reshape(2, 3)
    big = batch_of(x, 5)
    assert big.shape == (5, 3) and big.is_contiguous()
    assert torch.equal(big[2], x[0]) and torch.equal(big[4], x[0])
    ids, mask = batch_of((torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4)), 3)
    assert ids.shape == (3, 4) and ids.dtype == torch.long and mask.shape == (3, 4)
    with pytest.raises(TypeError, match="cannot batch"):
        batch_of("text", 2)
