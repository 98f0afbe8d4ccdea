"""The zero-mean analysis: capture, the op table, the plan."""

from .captured import Captured, capture, trains_with_own_flags
from .passes import analyze, analyze_captured
from .plan import FoldPlan, NormSite, Writer

__all__ = [
    "Captured",
    "FoldPlan",
    "NormSite",
    "Writer",
    "analyze",
    "analyze_captured",
    "capture",
    "trains_with_own_flags",
]
