"""The CBWC math, in one place: center a writer's output dim, fold a LayerScale into it, center at a lookup.

Centering subtracts, from every slice along ``dim``, its mean over ``dim``: for a Linear weight (out, in) and
dim 0 that makes every column sum to zero (1^T W = 0), so W h + b is zero-mean over the output features for
every h once the bias is centered too.  Computed in float64 and cast back, so a fold adds one rounding.
"""

from __future__ import annotations

import torch
from torch import nn


def centered(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` minus its mean over ``dim``, computed in float64 and returned in ``t``'s dtype."""
    t64 = t.detach().to(torch.float64)
    return (t64 - t64.mean(dim=dim, keepdim=True)).to(t.dtype)


@torch.no_grad()
def center_(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Center ``t`` over ``dim`` in place (a Parameter keeps its identity)."""
    t.copy_(centered(t, dim))
    return t


def max_column_mean(t: torch.Tensor, dim: int) -> float:
    """Largest |mean over dim| relative to the tensor's RMS: 0 for a centered writer (up to rounding)."""
    t64 = t.detach().to(torch.float64)
    rms = t64.pow(2).mean().sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    return float(t64.mean(dim=dim).abs().max() / rms) if t.numel() else 0.0


@torch.no_grad()
def fold_scale_(t: torch.Tensor, scale: torch.Tensor, dim: int) -> torch.Tensor:
    """Multiply ``t`` by a per-channel ``scale`` along ``dim`` in place (LayerScale g into its writer)."""
    shape = [1] * t.dim()
    shape[dim] = -1
    g = scale.detach().to(torch.float64).reshape(shape)
    t.copy_((t.detach().to(torch.float64) * g).to(t.dtype))
    return t


class CenteredEmbedding(nn.Embedding):
    """An Embedding whose looked-up rows are centered: E[ids] - mean(E[ids]).

    Used when the table is tied to another use (a GPT-2 lm_head): the table itself stays as it was, so the
    tie is exact, and the stream still receives zero-mean rows.  Same parameter, same state-dict keys.
    """

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
        rows = super().forward(ids)
        return rows - rows.mean(dim=-1, keepdim=True)
