"""Training with CBWC: convert a LayerNorm model, keep its writers centered, LoRA and parametrizations."""

from .conversion import convert
from .lora import merge_lora_
from .projection import attach, project_, project_grads_
from .state import CBWCState, converted_state, is_converted, unparametrize

__all__ = [
    "CBWCState",
    "attach",
    "convert",
    "converted_state",
    "is_converted",
    "merge_lora_",
    "project_",
    "project_grads_",
    "unparametrize",
]
