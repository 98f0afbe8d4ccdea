"""RMSNorm: the module that replaces a folded LayerNorm, and the op behind it."""

from .functional import add_rms_norm, kernel_status, load_kernels, rms_norm
from .module import RMSNorm, RMSNorm2d

__all__ = ["RMSNorm", "RMSNorm2d", "add_rms_norm", "kernel_status", "load_kernels", "rms_norm"]
