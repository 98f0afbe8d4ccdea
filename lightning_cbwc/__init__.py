"""lightning_cbwc: LayerNorm's behaviour at RMSNorm's cost, by column-based weight centering (CBWC).

plan = lightning_cbwc.analyze(model, (x,))    # which LayerNorms fold, and why not
folded = lightning_cbwc.fold(model, (x,))     # same outputs, RMSNorm inside
"""

from .analysis import FoldPlan, NormSite, Writer, analyze
from .errors import CaptureError, CBWCError, CheckpointError, FoldingError, UnsupportedError
from .fold import fold
from .norm import RMSNorm, RMSNorm2d

__version__ = "0.1.0"

__all__ = [
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
