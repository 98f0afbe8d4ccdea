"""The ``lightning-cbwc`` command line: inspect, fold, export, run recipes."""

from .main import main

__all__ = ["main"]
