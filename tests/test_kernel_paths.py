"""Every CPU code path of the C++ kernel this machine can run, each in its own process and build.

The suite's other kernel tests run the path this CPU picks by default (e.g. AVX-512 with the native bf16
instructions).  Here each lower path (AVX-512 without them, AVX2, the portable build) is built on its own
(``LIGHTNING_CBWC_CPU_CAPABILITY`` / ``LIGHTNING_CBWC_NATIVE_BF16``) and checked against the float64
references of ``test_kernels.py``.  Each build takes ~40 s the first time (cached after that).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_cbwc.norm import cpu as norm_cpu

TESTS = Path(__file__).resolve().parent
CHECKS = (
    "forward_matches or backward_matches or bf16_rounds or nan_stays or large_magnitude or mixed_dtype"
    " or add_rms_norm_forward or add_rms_norm_gradients"
)


def _paths() -> list[tuple[str, str, bool]]:
    """(id, capability, native bf16) of each path below this CPU's default."""
    native = str(torch.backends.cpu.get_cpu_capability()).upper()
    paths = []
    if native == "AVX512" and norm_cpu.has_native_bf16():
        paths.append(("avx512-no-native-bf16", "AVX512", False))
    if native == "AVX512":
        paths.append(("avx2", "AVX2", False))
    if native in ("AVX512", "AVX2"):
        paths.append(("portable", "DEFAULT", False))
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("cap,native_bf16", [p[1:] for p in _paths()], ids=[p[0] for p in _paths()])
def test_lower_code_path_matches_float64_reference(cap, native_bf16):
    env = dict(
        os.environ, LIGHTNING_CBWC_CPU_CAPABILITY=cap, LIGHTNING_CBWC_NATIVE_BF16=str(int(native_bf16))
    )
    env.pop("LIGHTNING_CBWC_DISABLE_KERNELS", None)
    probe = "from lightning_cbwc.norm import functional as fn; fn.load_kernels(); print(fn.kernel_status())"
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=600, check=True
    ).stdout
    expected = {"AVX512": "AVX512,", "AVX2": "AVX2,", "DEFAULT": "no SIMD capability"}[cap]
    assert f"C++ kernel ({expected}" in out, out
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(TESTS / "test_kernels.py"),
            "-k",
            CHECKS,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=TESTS.parent,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1], run.stdout[-500:]


def test_capability_can_be_lowered_not_raised(monkeypatch):
    native = str(torch.backends.cpu.get_cpu_capability()).upper()
    monkeypatch.setenv("LIGHTNING_CBWC_CPU_CAPABILITY", "default")
    assert norm_cpu.capability() == "DEFAULT"
    monkeypatch.setenv("LIGHTNING_CBWC_CPU_CAPABILITY", "AVX1024")
    with pytest.raises(ValueError, match="use one of"):
        norm_cpu.capability()
    if native != "AVX512":
        monkeypatch.setenv("LIGHTNING_CBWC_CPU_CAPABILITY", "AVX512")
        with pytest.raises(ValueError, match="runs at most"):
            norm_cpu.capability()


def test_native_bf16_flag_only_for_avx512_builds(monkeypatch):
    cflags, _ = norm_cpu.build_flags("AVX512", native_bf16=True)
    assert "-mavx512bf16" in cflags
    assert "-mavx512bf16" not in norm_cpu.build_flags("AVX512", native_bf16=False)[0]
    assert "-mavx512bf16" not in norm_cpu.build_flags("AVX2", native_bf16=True)[0]
    assert norm_cpu.extension_name("AVX512", True) != norm_cpu.extension_name("AVX512", False)
    monkeypatch.setenv("LIGHTNING_CBWC_NATIVE_BF16", "0")
    assert not norm_cpu.has_native_bf16()
