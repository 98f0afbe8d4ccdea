"""lightning_cbwc.timing: rotated rounds, paired ratios and their interval."""

from __future__ import annotations

from lightning_cbwc.timing import interleaved, median_ci, paired_ratio, verdict


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
