"""CBWC as a parametrization: W = V - mean_out(V) over the LayerNorm model's own weights V, with plain
``weight``/``bias`` keys in state dicts.

V is never centered: autograd gives it exactly the LayerNorm model's gradient, so every optimizer (coupled
weight decay, Adafactor, clipping in any order) sees the LayerNorm model's parameters and gradients.  A
writer followed by a LayerScale g uses :class:`ScaledCentering` (W = V - mean(g V) / g, g read live).

``torch.nn.utils.parametrize`` moves a parametrized tensor to ``<module>.parametrizations.<name>.original``
and turns ``<module>.<name>`` into a computed property.  That renames the state-dict key, which would break
``load_from_checkpoint``, resuming, and loading into the vanilla architecture.  :func:`parametrize_` therefore
also registers a state-dict post-hook and a load pre-hook on the module that map the key back and forth:
state dicts always hold the plain ``<module>.<name>`` key, with the trainable tensor ``V`` as its value.

Why ``V`` and not the centered ``V - mean(V)``: resuming from a checkpoint then restores the exact same
trainable tensor (bit-identical resume), and a LayerNorm model loading ``V`` computes exactly the same function
as the CBWC model (LayerNorm removes the per-sample shift that ``mean(V)`` adds).  Exports
(:func:`unparametrize_`) write the centered weights.

A plain Linear (or HF Conv1D) whose call sees fewer rows than it has inputs centers its *output* instead
(:func:`center_output_when_cheaper_`): ``x V^T + b`` minus its mean over the features is ``x W^T + b_c``, at
rows x out values of work instead of the weight's in x out, and V gets the same gradient.

The hooks are plain module-level functions (no closures over modules), so ``copy.deepcopy`` of a converted
model (EMA / weight averaging) keeps working; ``pickle`` of a parametrized module is refused by torch itself.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize as P

from ..centering import subtract_mean, subtract_scaled_mean

_PREFIX = "parametrizations."


class Centering(nn.Module):
    """The CBWC parametrization: ``X - X.mean(dim)`` (gradients flow through the centering).

    ``right_inverse`` is the identity, so registering it keeps the tensor, uncentered, as the trainable
    original.  ``zero_mean_grad``: the gradient arriving is zero-mean by construction (every norm downstream
    exact), so the backward is the identity (:func:`~lightning_cbwc.centering.subtract_mean`).
    """

    def __init__(self, dim: int, zero_mean_grad: bool = False) -> None:
        super().__init__()
        self.dim = int(dim)
        self.zero_mean_grad = bool(zero_mean_grad)
        #: True only during a call in which the owner centers its output instead (center_output_when_cheaper_)
        self.passthrough = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.passthrough:
            return x
        return subtract_mean(x, self.dim, self.zero_mean_grad)

    def extra_repr(self) -> str:
        return f"dim={self.dim}" + (", zero_mean_grad=True" if self.zero_mean_grad else "")


class ScaledCentering(Centering):
    """``X - mean(g X) / g`` for a writer followed by the LayerScale ``g = owner.<attr>``.

    ``g`` is looked up on every call (it trains, and ``.to()`` / ``load_state_dict`` may replace it); the
    owner is held as a plain attribute, not a submodule, so the state dict gains no keys and ``deepcopy``
    maps it to the copy's owner.
    """

    def __init__(self, dim: int, owner: nn.Module, attr: str) -> None:
        super().__init__(dim)
        object.__setattr__(self, "scale_owner", owner)
        self.scale_attr = attr

    @property
    def scale(self) -> torch.Tensor:
        return getattr(self.scale_owner, self.scale_attr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return subtract_scaled_mean(x, self.scale, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={type(self.scale_owner).__name__}.{self.scale_attr}"


def _centered_names(module: nn.Module) -> list[str]:
    """The tensor names of ``module`` that carry a Centering parametrization."""
    plist = getattr(module, "parametrizations", None)
    if plist is None:
        return []
    return [name for name, params in plist.items() if any(isinstance(p, Centering) for p in params)]


def _state_dict_plain_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook: ``parametrizations.<name>.original`` -> ``<name>`` for Centering parametrizations."""
    for name in _centered_names(module):
        old = f"{prefix}{_PREFIX}{name}.original"
        if old in state_dict:
            state_dict[f"{prefix}{name}"] = state_dict.pop(old)


def _load_plain_keys(
    module: nn.Module,
    state_dict: dict,
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    """Load pre-hook: accept the plain ``<name>`` key for a Centering-parametrized tensor."""
    for name in _centered_names(module):
        plain, new = f"{prefix}{name}", f"{prefix}{_PREFIX}{name}.original"
        if plain in state_dict and new not in state_dict:
            state_dict[new] = state_dict.pop(plain)


def _has_hook(hooks: dict, fn) -> bool:
    return any(getattr(h, "hook", h) is fn for h in hooks.values())


def parametrize_(module: nn.Module, name: str, dim: int, centering: Centering | None = None) -> None:
    """Register ``centering`` (default ``Centering(dim)``) on ``module.<name>`` (a Parameter) and the
    plain-key state-dict hooks.

    The Parameter object stays the same (it becomes ``parametrizations.<name>.original``), so optimizers built
    before or after keep working.  Idempotent.  Refuses a tensor that already has another parametrization.
    """
    if is_centered_parametrization(module, name):
        return
    if P.is_parametrized(module, name):
        raise ValueError(
            f"{type(module).__name__}.{name} already has a parametrization: use projection for it"
        )
    P.register_parametrization(module, name, centering or Centering(dim))
    if not _has_hook(module._state_dict_hooks, _state_dict_plain_keys):
        module.register_state_dict_post_hook(_state_dict_plain_keys)
    if not _has_hook(module._load_state_dict_pre_hooks, _load_plain_keys):
        module.register_load_state_dict_pre_hook(_load_plain_keys)


def is_centered_parametrization(module: nn.Module, name: str) -> bool:
    """True when ``module.<name>`` is parametrized by a :class:`Centering`."""
    if not P.is_parametrized(module, name):
        return False
    return any(isinstance(p, Centering) for p in module.parametrizations[name])


def original(module: nn.Module, name: str) -> torch.Tensor:
    """The trainable tensor behind ``module.<name>``: the parametrization's original, or the tensor itself."""
    if P.is_parametrized(module, name):
        return module.parametrizations[name].original
    t = module._parameters.get(name)
    if t is None:
        t = module._buffers.get(name)
    if t is None:
        raise AttributeError(f"{type(module).__name__} has no parameter or buffer {name!r}")
    return t


def _private_class(module: nn.Module) -> None:
    """Give a parametrized module its own copy of its generated class.

    torch makes one class per parametrized module, but ``copy.deepcopy`` shares it between the original and
    the copy, and ``remove_parametrizations`` deletes the property from that class: un-parametrizing a copy
    would break the original (``'ParametrizedLinear' object has no attribute 'weight'``).
    """
    cls = type(module)
    module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))


def _output_centerings(module: nn.Module) -> list[Centering] | None:
    """The plain Centerings of ``module.weight`` (and ``module.bias``) when the module's output can be centered
    in their place: a plain ``nn.Linear`` or HF ``Conv1D`` (output features last), both tensors centered."""
    if not P.is_parametrized(module, "weight"):
        return None
    cls = type(module).__bases__[0]  # the class torch's generated Parametrized<cls> derives from
    if not (cls is nn.Linear or (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers."))):
        return None
    plist = module.parametrizations
    out = []
    for name in ("weight", "bias"):
        params = plist[name] if name in plist else None
        if params is None:
            if module._parameters.get(name) is not None:
                return None
            continue
        if len(params) != 1 or type(params[0]) is not Centering:
            return None
        out.append(params[0])
    return out


#: instance-dict key: the Centerings a writer's pre-hook let through for the call in progress
_PASSING = "_cbwc_output_centering"


def _center_output_if_cheaper(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: with fewer rows than inputs, let V (and b) through and center the output instead."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.numel() >= x.shape[-1] ** 2:
        return  # rows >= inputs: centering the weight is the cheaper one
    centerings = _output_centerings(module)
    if not centerings:
        return
    v = module.parametrizations.weight.original
    if x.shape[-1] * v.shape[centerings[0].dim] != v.numel():
        return  # not this layer's input width: let the forward report it
    for c in centerings:
        c.passthrough = True
    module.__dict__[_PASSING] = centerings


def _centered_output(module: nn.Module, args: tuple, out: object) -> torch.Tensor | None:
    """Forward hook (run even when the forward raises): center the output the pre-hook let through."""
    centerings = module.__dict__.pop(_PASSING, None)
    if centerings is None:
        return None
    for c in centerings:
        c.passthrough = False
    if not isinstance(out, torch.Tensor):
        return None
    return subtract_mean(out, out.dim() - 1, centerings[0].zero_mean_grad)


def center_output_when_cheaper_(module: nn.Module) -> None:
    """On a centered plain Linear / Conv1D, center the output rather than the weight in calls with fewer rows
    than inputs (the same function and gradients; idempotent; no-op for other modules)."""
    if _output_centerings(module) is None or _has_hook(module._forward_pre_hooks, _center_output_if_cheaper):
        return
    module.register_forward_pre_hook(_center_output_if_cheaper)
    # first of the forward hooks, so a user's hook sees the centered output whichever way it was computed
    module.register_forward_hook(_centered_output, prepend=True, always_call=True)


def remove_output_centering(module: nn.Module) -> None:
    """Remove :func:`center_output_when_cheaper_`'s hooks from ``module``."""
    pairs = (
        (module._forward_pre_hooks, _center_output_if_cheaper),
        (module._forward_hooks, _centered_output),
    )
    for hooks, fn in pairs:
        for key in [k for k, h in hooks.items() if h is fn]:
            del hooks[key]
            module._forward_hooks_always_called.pop(key, None)


def unparametrize_(module: nn.Module) -> int:
    """Remove every Centering parametrization under ``module``, leaving the centered values in place.

    The Parameter objects are kept (torch sets them to the parametrized value), so optimizer state survives.
    Only tensors whose sole parametrization is a Centering are touched (:func:`parametrize_` never stacks on
    other parametrizations); returns how many tensors were un-parametrized.
    """
    count = 0
    for mod in list(module.modules()):
        plist = getattr(mod, "parametrizations", None)
        if plist is None or not P.is_parametrized(mod):
            continue
        for name in list(plist.keys()):
            params = plist[name]
            if len(params) == 1 and isinstance(params[0], Centering):
                _private_class(mod)
                P.remove_parametrizations(mod, name, leave_parametrized=True)
                count += 1
        remove_output_centering(mod)
    return count
