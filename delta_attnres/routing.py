"""The depth router: a softmax-weighted mix of sources, with one learned query per sublayer.

For sources s_0 .. s_{S-1}, each (B, T, D), a router with query w and key-norm gain g computes, per token,

    logit_i = w . RMSNorm_key(s_i) = (g * w) . s_i / rms(s_i)
    alpha   = softmax_i(logit_i)          (float32)
    route   = sum_i alpha_i * s_i         (values are not normalised)

`route` is the fused kernel used by the models. It folds the gain into the query, takes each source's
inverse RMS precomputed once when that source was produced, and saves for backward only references to
the sources (which stay alive anyway) and (S, B, T) float32 tensors, so activation memory grows
linearly with depth. `naive_route` is the direct transcription that stacks the sources into a new
(S, B, T, D) tensor and normalises every source at every call; it is the reference for tests and the
contrast in benchmarks.

Shapes: B batch, T tokens, D width, S sources.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

Tuple2 = tuple[Tensor, Tensor]


def inverse_rms(source: Tensor, eps: float) -> Tensor:
    """Return 1 / sqrt(mean(source^2) + eps) over the last dimension, in float32 or wider."""
    wide = _widen(source)
    return torch.rsqrt(wide.pow(2).mean(-1) + eps)  # (B, T)


def _widen(x: Tensor) -> Tensor:
    """Return x in float32, or unchanged when it is already float32 or wider (float64 in gradchecks)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class _FusedRoute(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, query: Tensor, inv_rms: Tensor, *sources: Tensor) -> Tuple2:
        q = _widen(query)
        dots = torch.stack([torch.matmul(_widen(s), q) for s in sources])  # (S, B, T)
        weights = torch.softmax(dots * inv_rms, dim=0)  # (S, B, T)

        out = torch.zeros(sources[0].shape, dtype=q.dtype, device=sources[0].device)  # (B, T, D)
        for weight, source in zip(weights, sources, strict=True):
            out.addcmul_(source, weight.unsqueeze(-1))

        ctx.save_for_backward(q, inv_rms, dots, weights, *sources)
        ctx.query_dtype = query.dtype
        ctx.mark_non_differentiable(weights)
        return out.to(sources[0].dtype), weights

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, _grad_weights: Tensor | None) -> tuple[Tensor | None, ...]:
        q, inv_rms, dots, weights, *sources = ctx.saved_tensors
        grad = grad_out.to(q.dtype)  # (B, T, D)

        # d route / d alpha_i = grad . s_i, then the softmax Jacobian gives d logit_i.
        grad_weights = torch.stack([torch.linalg.vecdot(_widen(s), grad) for s in sources])  # (S, B, T)
        grad_logits = weights * (grad_weights - (weights * grad_weights).sum(0, keepdim=True))
        coef = grad_logits * inv_rms  # d loss / d (q . s_i), (S, B, T)

        grad_sources = []
        grad_query = torch.zeros_like(q)
        for weight, c, source in zip(weights, coef, sources, strict=True):
            grad_source = grad * weight.unsqueeze(-1)
            grad_source.addcmul_(c.unsqueeze(-1), q)
            grad_sources.append(grad_source.to(source.dtype))
            grad_query += c.reshape(-1) @ _widen(source).reshape(-1, source.shape[-1])

        grad_inv_rms = grad_logits * dots
        return (grad_query.to(ctx.query_dtype), grad_inv_rms, *grad_sources)


def route(query: Tensor, gain: Tensor, sources: Sequence[Tensor], inv_rms: Sequence[Tensor]) -> Tuple2:
    """Mix `sources` with softmax weights; return the mix (dtype of the sources) and the weights (S, B, T).

    `inv_rms[i]` must be `inverse_rms(sources[i], eps)`. The returned weights are detached float32.
    """
    folded = query * gain  # RMSNorm_key(s) . w == (g * w) . s / rms(s)
    # Autocast would run the logits' matmul in bf16; the kernel chooses its own float32 precision.
    with torch.autocast(sources[0].device.type, enabled=False):
        mixed, weights = _FusedRoute.apply(folded, torch.stack(list(inv_rms)), *sources)
    return mixed, weights


def naive_route(query: Tensor, gain: Tensor, sources: Sequence[Tensor], eps: float) -> Tuple2:
    """Reference router: stack, normalise every source, softmax in float32, weighted sum."""
    stacked = torch.stack(list(sources))  # (S, B, T, D)
    with torch.autocast(stacked.device.type, enabled=False):
        return _naive_route_wide(_widen(query), _widen(gain), stacked, eps)


def _naive_route_wide(query: Tensor, gain: Tensor, stacked: Tensor, eps: float) -> Tuple2:
    wide = _widen(stacked)
    normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps) * gain
    logits = torch.einsum("sbtd,d->sbt", normed, query)
    weights = torch.softmax(logits, dim=0)  # (S, B, T)
    mixed = torch.einsum("sbt,sbtd->btd", weights, wide)
    return mixed.to(stacked.dtype), weights.detach()
