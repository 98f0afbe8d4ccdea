"""lightning_cbwc: LayerNorm's behaviour at RMSNorm's cost, by column-based weight centering (CBWC).

plan = lightning_cbwc.analyze(model, (x,))    # which LayerNorms fold, and why not
folded = lightning_cbwc.fold(model, (x,))     # same outputs, RMSNorm inside
"""

from typing import TYPE_CHECKING, Any

from .analysis import FoldPlan, NormSite, Writer, analyze
from .errors import (
    CaptureError,
    CBWCError,
    CheckpointError,
    ExportError,
    FoldCheckError,
    FoldingError,
    SpecError,
    UnsupportedError,
)
from .export import load_folded
from .folding import fold
from .norm import RMSNorm, RMSNorm2d
from .training import attach, convert, project_, project_grads_, unparametrize

if TYPE_CHECKING:
    from .lightning import CBWC

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # the callback imports Lightning (slow): load it on first use (``lightning_cbwc.CBWC``, YAML class_path)
    if name == "CBWC":
        from .lightning import CBWC

        return CBWC
    raise AttributeError(f"module 'lightning_cbwc' has no attribute {name!r}")


__all__ = [
    "CBWC",
    "CBWCError",
    "CaptureError",
    "CheckpointError",
    "ExportError",
    "FoldCheckError",
    "FoldPlan",
    "FoldingError",
    "NormSite",
    "RMSNorm",
    "RMSNorm2d",
    "SpecError",
    "UnsupportedError",
    "Writer",
    "analyze",
    "attach",
    "convert",
    "fold",
    "load_folded",
    "project_",
    "project_grads_",
    "unparametrize",
]
