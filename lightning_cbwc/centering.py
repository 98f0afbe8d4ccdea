"""The CBWC math, in one place: center a writer's output dim, fold a LayerScale into it, center at a lookup.

Centering subtracts, from every slice along ``dim``, its mean over ``dim``: for a Linear weight (out, in) and
dim 0 that makes every column sum to zero (1^T W = 0), so W h + b is zero-mean over the output features for
every h once the bias is centered too.  Computed in float64 and cast back, so a fold adds one rounding.

Training keeps a writer W = V - mean(V) centered.  Its backward is the same projection, except where the
gradient arriving is zero-mean by construction (every norm the writer reaches computes LayerNorm's backward
and nothing else sees its shift: ``zero_mean_grad``): the projection is then the identity, and skipped.

A writer followed by a trainable LayerScale g (``x + g * (W h + b)``) is centered *scaled*:
W - mean(g W) / g, so that g * W has zero column means for every g without zeros, and g * W equals the
LayerNorm model's P(g * V): the function of (V, g) is LayerNorm's exactly, gradients included.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .norm.functional import center_columns_, centered_embedding


def centered(t: torch.Tensor, dim: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` minus its mean over ``dim`` (scaled by a LayerScale ``scale``: :func:`subtract_scaled_mean`),
    computed in float64 and returned in ``t``'s dtype."""
    t64 = t.detach().to(torch.float64)
    if scale is not None:
        return subtract_scaled_mean(t64, scale.detach().to(torch.float64), dim).to(t.dtype)
    return subtract_mean(t64, dim).to(t.dtype)


@torch.no_grad()
def center_(t: torch.Tensor, dim: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Center ``t`` over ``dim`` in place (a Parameter keeps its identity)."""
    t.copy_(centered(t, dim, scale))
    return t


def max_column_mean(t: torch.Tensor, dim: int) -> float:
    """Largest |mean over dim| relative to the tensor's RMS: 0 for a centered writer (up to rounding)."""
    t64 = t.detach().to(torch.float64)
    rms = t64.pow(2).mean().sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    return float(t64.mean(dim=dim).abs().max() / rms) if t.numel() else 0.0


def _along(scale: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """``scale`` (one value per slice along ``dim``) shaped to broadcast against ``like``."""
    shape = [1] * like.dim()
    shape[dim] = -1
    return scale.reshape(shape)


@torch.no_grad()
def fold_scale_(t: torch.Tensor, scale: torch.Tensor, dim: int) -> torch.Tensor:
    """Multiply ``t`` by a per-channel ``scale`` along ``dim`` in place (LayerScale g into its writer)."""
    g = _along(scale.detach().to(torch.float64), t, dim)
    t.copy_((t.detach().to(torch.float64) * g).to(t.dtype))
    return t


class _SubtractMean(torch.autograd.Function):
    """``x - mean(x, dim)``, whose backward is the same projection (the centering matrix is symmetric): two
    ops each way where autograd's generic backward of the composite takes four or five, per writer and step."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, dim: int) -> torch.Tensor:
        return x - x.mean(dim=dim, keepdim=True)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.dim = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad - grad.mean(dim=ctx.dim, keepdim=True), None


#: from this many elements on, :class:`_SubtractMean`'s saved full-size pass outweighs the Python Function's
#: fixed cost (the crossover measured in BENCHMARKS.md, training step)
_FUNCTION_FROM = 1 << 18


def subtract_mean(x: torch.Tensor, dim: int, zero_mean_grad: bool = False) -> torch.Tensor:
    """``x - mean(x, dim)``, differentiable (the parametrized form of a centered writer).

    ``zero_mean_grad``: the caller knows the incoming gradient is already zero-mean over ``dim``, so the
    backward (the projection) is the identity: the mean is taken off the graph, one pass instead of three.
    """
    if zero_mean_grad:
        return x - x.detach().mean(dim=dim, keepdim=True)
    if x.numel() >= _FUNCTION_FROM and torch.is_grad_enabled() and x.requires_grad:
        return _SubtractMean.apply(x, dim)
    return x - x.mean(dim=dim, keepdim=True)


def subtract_scaled_mean(x: torch.Tensor, scale: torch.Tensor, dim: int) -> torch.Tensor:
    """``x - mean(scale * x, dim) / scale``: ``scale * result`` is zero-mean over ``dim`` (a writer followed
    by the LayerScale ``scale``), differentiable in both; ``scale`` must have no zeros."""
    g = _along(scale, x, dim).to(x.dtype)
    return x - (g * x).mean(dim=dim, keepdim=True) / g


@torch.no_grad()
def fast_center_(t: torch.Tensor, dim: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Center ``t`` over ``dim`` in place in its own precision (16-bit tensors through float32, one rounding):
    the per-step projection, cheaper than :func:`center_`.  With ``scale``: the scaled centering."""
    if scale is None and t.dtype not in (torch.float16, torch.bfloat16):
        return t.sub_(t.mean(dim=dim, keepdim=True))
    f = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
    out = subtract_mean(f, dim) if scale is None else subtract_scaled_mean(f, scale.detach(), dim)
    return t.copy_(out)


_BATCHED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@torch.no_grad()
def fast_center_all_(tensors: list[torch.Tensor], dims: list[int]) -> None:
    """:func:`fast_center_` of each ``tensors[i]`` over ``dims[i]``; the contiguous plain CPU ones in one C++
    call (``norm.functional.center_columns_``), the others (DTensor shards, GPU, strided) one by one."""
    plain = [
        i
        for i, t in enumerate(tensors)
        if type(t) in (torch.Tensor, nn.Parameter)
        and t.is_cpu
        and t.is_contiguous()
        and t.dtype in _BATCHED_DTYPES
    ]
    rest = set(range(len(tensors)))
    if plain and center_columns_([tensors[i] for i in plain], [dims[i] for i in plain]):
        rest -= set(plain)
    for i in sorted(rest):
        fast_center_(tensors[i], dims[i])


def is_uncentered(t: torch.Tensor, dim: int, scale: torch.Tensor | None = None) -> bool:
    """Whether floating ``t``'s :func:`scaled_column_mean` exceeds a few roundings of its dtype: a writer
    that needs re-centering (centered ones are left bit-identical)."""
    return t.is_floating_point() and scaled_column_mean(t, dim, scale) > 8 * torch.finfo(t.dtype).eps


def scaled_column_mean(t: torch.Tensor, dim: int, scale: torch.Tensor | None) -> float:
    """:func:`max_column_mean` of ``scale * t`` (of ``t`` without a scale): 0 for a centered writer."""
    if scale is None:
        return max_column_mean(t, dim)
    return max_column_mean(t.detach().double() * _along(scale.detach().double(), t, dim), dim)


def center_lookup_output(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """Forward hook of an ``nn.Embedding`` subclass with its own forward (a lookup times a scalar, as BART's
    and BioGPT's scaled embeddings): its output centered, which is its looked-up rows centered, scaled."""
    return subtract_mean(out, -1)


def centers_lookup_output(module: nn.Module) -> bool:
    return any(h is center_lookup_output for h in module._forward_hooks.values())


class _CenteredLookup(torch.autograd.Function):
    """``E[ids]`` with each row centered, in one C++ pass; the backward is the plain lookup's (a scatter-add of
    the gradient), right only where the incoming gradient is zero-mean by construction."""

    @staticmethod
    def forward(
        ctx: Any, weight: torch.Tensor, ids: torch.Tensor, padding_idx: int, by_freq: bool
    ) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.lookup = (weight.shape[0], padding_idx, by_freq)
        return centered_embedding(weight, ids)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (ids,) = ctx.saved_tensors
        num, padding_idx, by_freq = ctx.lookup
        dweight = torch.ops.aten.embedding_dense_backward(grad, ids, num, padding_idx, by_freq)
        return dweight, None, None, None


class CenteredEmbedding(nn.Embedding):
    """An Embedding whose looked-up rows are centered: E[ids] - mean(E[ids]).

    Used when the table is tied to another use (a GPT-2 lm_head): the table itself stays as it was, so the
    tie is exact, and the stream still receives zero-mean rows.  Same parameter, same state-dict keys.
    ``zero_mean_grad`` (set by CBWC training when every norm downstream is exact): the rows' gradient is
    zero-mean by construction, so the backward skips the centering (:func:`subtract_mean`).
    """

    zero_mean_grad: bool = False

    @classmethod
    def adopt(cls, emb: nn.Embedding) -> CenteredEmbedding:
        new = cls(
            emb.num_embeddings,
            emb.embedding_dim,
            padding_idx=emb.padding_idx,
            max_norm=emb.max_norm,
            norm_type=emb.norm_type,
            scale_grad_by_freq=emb.scale_grad_by_freq,
            sparse=emb.sparse,
            device="meta",
        )
        new.weight = emb.weight
        new.train(emb.training)
        return new

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and self.weight.requires_grad
        if self.max_norm is None and not needs_grad:  # inference: one call (max_norm renormalizes the table)
            return centered_embedding(self.weight, ids)
        if self.zero_mean_grad and self.max_norm is None and not self.sparse and self.weight.is_cpu:
            padding_idx = -1 if self.padding_idx is None else self.padding_idx
            return _CenteredLookup.apply(self.weight, ids, padding_idx, self.scale_grad_by_freq)
        rows = super().forward(ids)  # padding_idx, sparse, scale_grad_by_freq: the gradient Embedding gives
        return subtract_mean(rows, -1, self.zero_mean_grad)
