"""Model inputs in every form users pass them, turned into one: ``(args, kwargs)``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def split_inputs(inputs: Any, kwargs: Mapping[str, Any] | None = None) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` for calling a model.

    ``inputs`` may be one value (a tensor: one positional argument), a tuple or list (positional arguments),
    a dict (keyword arguments, Lightning's ``example_input_array`` convention) or an ``(args_tuple,
    kwargs_dict)`` pair; ``kwargs`` are added to the keyword arguments (they win on a clash).
    """
    if (
        isinstance(inputs, tuple)
        and len(inputs) == 2
        and isinstance(inputs[0], tuple)
        and isinstance(inputs[1], Mapping)
    ):
        args, kw = inputs[0], dict(inputs[1])
    elif isinstance(inputs, Mapping):
        args, kw = (), dict(inputs)
    elif isinstance(inputs, tuple | list):
        args, kw = tuple(inputs), {}
    elif inputs is None:
        args, kw = (), {}
    else:
        args, kw = (inputs,), {}
    kw.update(kwargs or {})
    return args, kw
