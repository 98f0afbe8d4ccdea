"""lightning_cbwc: LayerNorm's behaviour at RMSNorm's cost, by column-based weight centering (CBWC).

plan = lightning_cbwc.analyze(model, (x,))    # which LayerNorms fold, and why not
folded = lightning_cbwc.fold(model, (x,))     # same outputs, RMSNorm inside
"""

from typing import TYPE_CHECKING, Any

from .analysis import FoldPlan, NormSite, Writer, analyze
from .convert import attach, convert, project_, project_grads_
from .errors import CaptureError, CBWCError, CheckpointError, FoldingError, UnsupportedError
from .fold import fold
from .norm import RMSNorm, RMSNorm2d

if TYPE_CHECKING:
    from .callback import CBWC

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # the callback imports Lightning (slow): load it on first use (``lightning_cbwc.CBWC``, YAML class_path)
    if name == "CBWC":
        from .callback import CBWC

        return CBWC
    raise AttributeError(f"module 'lightning_cbwc' has no attribute {name!r}")


__all__ = [
    "CBWC",
    "attach",
    "convert",
    "project_",
    "project_grads_",
    "CBWCError",
    "CaptureError",
    "CheckpointError",
    "FoldPlan",
    "FoldingError",
    "NormSite",
    "RMSNorm",
    "RMSNorm2d",
    "UnsupportedError",
    "Writer",
    "analyze",
    "fold",
]
