"""The ``lightning-cbwc`` command line: inspect, fold, export, run recipes."""

from .commands import main

__all__ = ["main"]
