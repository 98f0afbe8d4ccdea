"""The Lightning layer: the CBWC callback and the only code that reads Lightning's trainer."""

from .callback import CBWC

__all__ = ["CBWC"]
