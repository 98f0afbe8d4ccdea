"""The zero-mean analysis: capture, the op table, the plan."""

from .analyze import analyze, analyze_captured
from .capture import Captured, capture
from .plan import FoldPlan, NormSite, Writer

__all__ = ["Captured", "FoldPlan", "NormSite", "Writer", "analyze", "analyze_captured", "capture"]
