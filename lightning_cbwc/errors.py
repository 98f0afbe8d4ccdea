"""Errors the package raises: each names the problem and the fix; `first_line` quotes the error behind one."""

from __future__ import annotations


def first_line(e: BaseException, limit: int | None = 400) -> str:
    """The first non-empty line of an exception's message (its type name when it has none), cut at ``limit``."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0][:limit] if limit else lines[0]) if lines else type(e).__name__


class CBWCError(Exception):
    """Base class of lightning_cbwc's errors."""


class CaptureError(CBWCError):
    """torch.export could not capture the model."""


class FoldingError(CBWCError):
    """A folded model does not reproduce the original's outputs, or a fold cannot be applied."""


class FoldCheckError(FoldingError):
    """The folded model's outputs differ from the original's beyond the tolerance."""

    def __init__(self, max_error: float, tolerance: float, message: str) -> None:
        super().__init__(message)
        self.max_error = max_error
        self.tolerance = tolerance


class CheckpointError(CBWCError):
    """A checkpoint does not match the model it is loaded into."""


class UnsupportedError(CBWCError):
    """A combination the package does not support (e.g. FSDP1, DoRA)."""


class ExportError(CBWCError):
    """An export could not be written, or the written artefact does not reproduce the PyTorch model
    (then ``max_error`` and ``tolerance`` are set; otherwise they are None)."""

    def __init__(self, message: str, max_error: float | None = None, tolerance: float | None = None) -> None:
        super().__init__(message)
        self.max_error = max_error
        self.tolerance = tolerance


class SpecError(CBWCError):
    """A model spec that cannot be parsed or loaded (bad form, missing file, unknown model)."""
