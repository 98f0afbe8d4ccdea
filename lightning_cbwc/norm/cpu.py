"""Build and load the C++ CPU kernel (``csrc/rms_norm.cpp`` + ``csrc/rms_norm_op.cpp``) on first use.

The source ships in the package and is compiled with :func:`torch.utils.cpp_extension.load` into the torch
extensions cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions/<py>_<cuda>/``), so only the
first process on a machine pays the compile (~30-60 s); later processes load the cached library.

Two build facts matter for speed (see DESIGN.md, "Kernel notes"):

* ATen's ``Vectorized<T>`` falls back to scalar code unless ``CPU_CAPABILITY_<CAP>`` and ``CPU_CAPABILITY``
  are defined, so the capability torch itself dispatches to (``torch.backends.cpu.get_cpu_capability()``)
  is passed, with the matching ``-m`` flags, and is part of the extension name so caches built for
  different CPUs never collide.
* ``at::parallel_for`` runs serially unless compiled and linked with ``-fopenmp``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from pathlib import Path

import torch

logger = logging.getLogger("lightning_cbwc")

# Two translation units (kernels; registration + autograd) so that ninja compiles them in parallel.
SOURCES = [Path(__file__).with_name("csrc") / name for name in ("rms_norm.cpp", "rms_norm_op.cpp")]

# capability -> (defines, machine flags).  Anything else (DEFAULT, ARM, POWER, s390x) builds the portable
# code path: still correct, but ATen's vector types are then scalar loops on x86.
_CAPABILITY_FLAGS: dict[str, tuple[list[str], list[str]]] = {
    "AVX512": (
        ["-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    ),
    "AVX2": (["-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"], ["-mavx2", "-mfma", "-mf16c"]),
}

_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet
_reason = "not loaded yet"
_name = ""


_CAPABILITY_ORDER = ("DEFAULT", "AVX2", "AVX512")


def capability() -> str:
    """The CPU capability the kernel is built for: torch's own (e.g. ``"AVX2"``), or a lower one that
    ``LIGHTNING_CBWC_CPU_CAPABILITY`` asks for (``DEFAULT``, ``AVX2``; to test or pin a code path)."""
    native = str(torch.backends.cpu.get_cpu_capability()).upper()
    wanted = os.environ.get("LIGHTNING_CBWC_CPU_CAPABILITY", "").strip().upper()
    if not wanted:
        return native
    if wanted not in _CAPABILITY_ORDER:
        raise ValueError(
            f"LIGHTNING_CBWC_CPU_CAPABILITY={wanted!r}: use one of {', '.join(_CAPABILITY_ORDER)}"
        )
    if native in _CAPABILITY_ORDER and _CAPABILITY_ORDER.index(wanted) > _CAPABILITY_ORDER.index(native):
        raise ValueError(
            f"LIGHTNING_CBWC_CPU_CAPABILITY={wanted}: this CPU runs at most {native}; unset it or ask for less"
        )
    return wanted


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel of this machine reports (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def has_native_bf16() -> bool:
    """Whether the build uses the hardware bf16 instructions: the CPU has ``avx512_bf16`` and
    ``LIGHTNING_CBWC_NATIVE_BF16=0`` does not turn them off."""
    off = os.environ.get("LIGHTNING_CBWC_NATIVE_BF16", "").strip().lower() in ("0", "false", "no")
    return not off and "avx512_bf16" in cpu_flags()


def build_flags(cap: str | None = None, native_bf16: bool | None = None) -> tuple[list[str], list[str]]:
    """(extra_cflags, extra_ldflags) for the given capability (default: this machine's).

    ``native_bf16`` (default: what this CPU has) adds ``-mavx512bf16`` to an AVX512 build, which switches the
    bf16 kernels to the hardware conversions.
    """
    cap = capability() if cap is None else cap.upper()
    defines, machine = _CAPABILITY_FLAGS.get(cap, ([], []))
    if native_bf16 is None:
        native_bf16 = has_native_bf16()
    extra = ["-mavx512bf16"] if cap == "AVX512" and native_bf16 else []
    cflags = ["-O3", "-fopenmp", "-DNDEBUG", *defines, *machine, *extra]
    return cflags, ["-fopenmp"]


def extension_name(cap: str | None = None, native_bf16: bool | None = None) -> str:
    """Cache name: capability, torch version and a hash of the sources and flags.

    Different CPUs, torch builds and source versions (two checkouts sharing one cache) never share a build.
    """
    cap = capability() if cap is None else cap.upper()
    tv = re.sub(r"[^0-9a-zA-Z]+", "_", torch.__version__)
    h = hashlib.sha256(repr(build_flags(cap, native_bf16)).encode())
    for src in SOURCES:
        h.update(src.read_bytes())
    return f"lightning_cbwc_rms_norm_{cap.lower()}_torch{tv}_{h.hexdigest()[:10]}"


def disabled_by_env() -> bool:
    return os.environ.get("LIGHTNING_CBWC_DISABLE_KERNELS", "").strip().lower() not in (
        "",
        "0",
        "false",
        "no",
    )


def _import_cpp_extension():
    """``torch.utils.cpp_extension``, without its import-time "No CUDA runtime is found" warning (CPU build)."""
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        cpp_logger.setLevel(level)
    return cpp_extension


def library_name() -> str:
    """Name (= cache folder) of the extension this process built or loaded ("" before :func:`load`)."""
    return _name


def _already_registered() -> bool:
    try:
        torch.ops.lightning_cbwc.rms_norm.default  # noqa: B018
        torch.ops.lightning_cbwc.rms_norm_backward.default  # noqa: B018
        torch.ops.lightning_cbwc.zero_mean_rms_norm.default  # noqa: B018
        torch.ops.lightning_cbwc.add_rms_norm.default  # noqa: B018
        torch.ops.lightning_cbwc.centered_embedding.default  # noqa: B018
        torch.ops.lightning_cbwc.center_columns_.default  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def load(verbose: bool = False) -> tuple[bool, str]:
    """Build (first time) and load the kernel library; returns ``(ok, reason)``.

    Never raises, except for a bad ``LIGHTNING_CBWC_CPU_CAPABILITY`` (a setting to fix, not a build failure).

    On failure logs ONE warning on the ``lightning_cbwc`` logger and remembers the reason; later calls
    return the remembered result without retrying.
    """
    global _loaded, _reason, _name
    if disabled_by_env():
        # Not remembered: the env var is re-read on every call (tests toggle it).
        return False, "disabled by LIGHTNING_CBWC_DISABLE_KERNELS=1"
    if _loaded is not None:
        return _loaded, _reason
    with _lock:
        if _loaded is not None:
            return _loaded, _reason
        _name = extension_name()
        try:
            if not _already_registered():
                cpp_extension = _import_cpp_extension()
                cflags, ldflags = build_flags()
                cpp_extension.load(
                    name=_name,
                    sources=[str(p) for p in SOURCES],
                    extra_cflags=cflags,
                    extra_ldflags=ldflags,
                    is_python_module=False,
                    verbose=verbose,
                )
            if not _already_registered():
                raise RuntimeError("library loaded but lightning_cbwc::rms_norm is not registered")
            from . import ops

            ops.register_fakes()
            info = torch.ops.lightning_cbwc._rms_norm_build_info()
            _loaded, _reason = True, f"C++ kernel ({info})"
        except Exception as exc:  # compiler missing, build error, load error
            text = str(exc) if exc.__cause__ is None else f"{exc}: {exc.__cause__}"
            lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
            # cpp_extension's message is the whole build log: keep its first line and first compiler error.
            errors = [ln for ln in lines if re.search(r"\berror:", ln)]
            short = " ".join((lines[:1] or [type(exc).__name__]) + errors[:1])
            if len(short) > 300:
                short = short[:300] + "..."
            _loaded, _reason = False, f"C++ kernel could not be built: {type(exc).__name__}: {short}"
            logger.warning(
                "lightning_cbwc: the CPU RMSNorm kernel could not be built (%s); folded norms fall back to "
                "F.layer_norm (the same function on their zero-mean input, as fast as the LayerNorm they "
                "replaced), other RMSNorm layers to a slower pure-torch composite.",
                _reason,
            )
        return _loaded, _reason


def status() -> tuple[bool | None, str]:
    """``(loaded, reason)`` without triggering a build (``loaded`` is None when not tried yet)."""
    return _loaded, _reason


def _reset() -> None:
    """Forget the load result (tests only; a loaded library stays loaded)."""
    global _loaded, _reason
    with _lock:
        _loaded, _reason = None, "not loaded yet"
