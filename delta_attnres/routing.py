"""The depth router: a softmax-weighted mix of sources, with one learned query per sublayer.

For sources s_0 .. s_{S-1}, each (B, T, D), a router with query w and key-norm gain g computes, per token,

    logit_i = w . RMSNorm_key(s_i) = (g * w) . s_i / rms(s_i)
    alpha   = softmax_i(logit_i)          (float32)
    route   = sum_i alpha_i * s_i         (values are not normalised)

`route` is the fused kernel used by the models. It folds the gain into the query and takes each source's
inverse RMS, precomputed once when that source was produced. For backward it saves references to the
sources and their inverse RMS, which stay alive anyway, plus the folded query and one (S, B, T) float32
tensor of logits. Activation memory therefore grows linearly with depth. `route_norm` also applies the
sublayer's pre-norm and recomputes the mix in backward instead of saving it, for replacement routing,
whose mix is read by nothing but that norm. Without autograd, both stack small inputs instead (see
`_STACKED_MAX_ELEMENTS`), which is faster when decoding one token at a time. `naive_route` is the direct
transcription that stacks the sources into a new (S, B, T, D) tensor and normalises every source at
every call; it is the reference for tests and the contrast in benchmarks.

Gradient accumulation. A source read by n routers would receive n separate (B, T, D) gradient tensors,
one from each router's backward, so a model with L layers would allocate O(L^2) of them per step. Instead,
`inverse_rms` attaches a `SourceGradient` accumulator to the inverse RMS it returns. Each router's
backward adds its contribution for that source into the accumulator in place, and the backward of
`inverse_rms` hands the sum to the source. Autograd runs that backward only after every router that read
the inverse RMS, because each of them returns a gradient for it. The result is one gradient tensor per
source. Under `torch.compile` the accumulators are skipped, and every router returns its gradients.

Shapes: B batch, T tokens, D width, S sources.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .norm import norm_backward, norm_forward

Tuple2 = tuple[Tensor, Tensor]

# Name of the attribute through which an inverse-RMS tensor carries the accumulator of its source.
_GRADIENT_ATTRIBUTE = "_routing_source_gradient"


def _wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype routing computes in: float32, or float64 for float64 inputs (gradchecks)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _widen(x: Tensor) -> Tensor:
    """Return x in float32, or unchanged when it is already float32 or wider (float64 in gradchecks)."""
    return x.to(_wide_dtype(x.dtype))


class SourceGradient:
    """Accumulator of the gradients that routers send to one source during one backward pass.

    Contributions are tagged with the id of the autograd graph task that produced them. A backward pass
    can stop before it reaches the source, for example `torch.autograd.grad` with `inputs` that exclude
    it, and the tag keeps its partial sum out of a later pass over a retained graph.
    """

    def __init__(self, source: Tensor) -> None:
        self._source = weakref.ref(source)
        self._task = -1
        self._grad: Tensor | None = None

    def belongs_to(self, source: Tensor) -> bool:
        return self._source() is source

    def add_(self, grad_out: Tensor, weight: Tensor, coef: Tensor, query: Tensor) -> None:
        """Add weight * grad_out + coef (x) query, the gradient of one route output w.r.t. this source."""
        task = torch._C._current_graph_task_id()
        if self._grad is None or self._task != task:
            self._grad = torch.mul(grad_out, weight.unsqueeze(-1))
            self._task = task
        else:
            self._grad.addcmul_(grad_out, weight.unsqueeze(-1))
        self._grad.addcmul_(coef.unsqueeze(-1), query)

    def pop(self) -> Tensor | None:
        """Return the sum accumulated in the current backward pass (None if empty) and clear it."""
        grad, self._grad = self._grad, None
        if grad is None or self._task != torch._C._current_graph_task_id():
            return None
        return grad


def _inverse_rms_value(source: Tensor, eps: float) -> Tensor:
    # One pass over the source and no (B, T, D) temporary, unlike source.pow(2).mean(-1).
    norm = torch.linalg.vector_norm(source, dim=-1, dtype=_wide_dtype(source.dtype))
    return torch.rsqrt(norm.square() / source.shape[-1] + eps)


class _InverseRMS(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, source: Tensor, eps: float, gradient: SourceGradient) -> Tensor:
        inv_rms = _inverse_rms_value(source, eps)
        ctx.save_for_backward(source, inv_rms)
        ctx.gradient = gradient
        ctx.set_materialize_grads(False)
        return inv_rms

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_inv_rms: Tensor | None) -> tuple[Tensor | None, None, None]:
        source, inv_rms = ctx.saved_tensors
        grad = ctx.gradient.pop()  # what the routers sent to this source
        if grad_inv_rms is not None:
            # d inv_rms / d source = -inv_rms^3 * source / D
            coef = (grad_inv_rms * inv_rms.pow(3) * (-1.0 / source.shape[-1])).unsqueeze(-1)
            grad = source * coef if grad is None else grad.addcmul_(source, coef)
        return (None if grad is None else grad.to(source.dtype)), None, None


def inverse_rms(source: Tensor, eps: float) -> Tensor:
    """Return 1 / sqrt(mean(source^2) + eps) over the last dimension, in float32 or wider.

    When the source requires grad (outside `torch.compile`), the result carries the accumulator
    through which `route` sends the source its gradient (see the module docstring).
    """
    if torch.compiler.is_compiling() or not (torch.is_grad_enabled() and source.requires_grad):
        return _inverse_rms_value(source, eps)
    gradient = SourceGradient(source)
    inv_rms = _InverseRMS.apply(source, eps, gradient)
    setattr(inv_rms, _GRADIENT_ATTRIBUTE, gradient)
    return inv_rms


def _source_gradient(inv_rms: Tensor, source: Tensor) -> SourceGradient | None:
    gradient = getattr(inv_rms, _GRADIENT_ATTRIBUTE, None)
    if isinstance(gradient, SourceGradient) and gradient.belongs_to(source):
        return gradient
    return None


def _mix_forward(
    query: Tensor, inv_rms: Sequence[Tensor], sources: Sequence[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Return the mix (B, T, D) in the query's dtype, and the logits and weights (S, B, T)."""
    shape = sources[0].shape
    # The output buffer doubles as scratch space for the products q * s_i.
    out = torch.empty(shape, dtype=query.dtype, device=query.device)  # (B, T, D)
    logits = torch.empty((len(sources), *shape[:-1]), dtype=query.dtype, device=query.device)  # (S, B, T)
    for index, source in enumerate(sources):
        torch.sum(torch.mul(source, query, out=out), dim=-1, out=logits[index])
        logits[index].mul_(inv_rms[index])
    weights = torch.softmax(logits, dim=0)
    _weighted_sum(weights, sources, out)
    return out, logits, weights


def _weighted_sum(weights: Tensor, sources: Sequence[Tensor], out: Tensor) -> Tensor:
    """Write sum_i weights_i * s_i into `out` and return it."""
    torch.mul(sources[0], weights[0].unsqueeze(-1), out=out)
    for weight, source in zip(weights[1:], sources[1:], strict=True):
        out.addcmul_(source, weight.unsqueeze(-1))
    return out


def _mix_dtype(sources: Sequence[Tensor]) -> torch.dtype:
    dtype = sources[0].dtype
    for source in sources[1:]:
        dtype = torch.promote_types(dtype, source.dtype)
    return dtype


def _mix_backward(
    ctx: Any,
    grad: Tensor,
    query: Tensor,
    logits: Tensor,
    weights: Tensor,
    inv_rms: Sequence[Tensor],
    sources: Sequence[Tensor],
    first_source_input: int,
) -> tuple[Tensor, list[Tensor], list[Tensor | None]]:
    """Return the gradients of the mix w.r.t. the folded query, the inverse RMS and the sources.

    `grad` is d loss / d mix in the query's dtype and is only read. `first_source_input` is the index
    of s_0 among the autograd Function's inputs, for `ctx.needs_input_grad`.
    """
    # d route / d alpha_i = grad . s_i, then the softmax Jacobian gives d logit_i.
    scratch = torch.empty_like(grad)
    grad_weights = torch.empty_like(logits)
    for index, source in enumerate(sources):
        torch.sum(torch.mul(source, grad, out=scratch), dim=-1, out=grad_weights[index])
    grad_logits = weights * (grad_weights - (weights * grad_weights).sum(0, keepdim=True))
    coefs = grad_logits * torch.stack(list(inv_rms))  # d loss / d (q . s_i), (S, B, T)

    # d loss / d q = sum_i sum_tokens coef_i * s_i, accumulated per token in the scratch buffer.
    grad_query = _weighted_sum(coefs, sources, scratch).flatten(0, -2).sum(0)

    grad_inv_rms = [g * logit / inv for g, logit, inv in zip(grad_logits, logits, inv_rms, strict=True)]
    grad_sources: list[Tensor | None] = []
    gradients = ctx.gradients or (None,) * len(sources)
    for index, source in enumerate(sources):
        weight, coef, gradient = weights[index], coefs[index], gradients[index]
        if not ctx.needs_input_grad[first_source_input + index]:
            grad_sources.append(None)
        elif gradient is not None:
            gradient.add_(grad, weight, coef, query)
            grad_sources.append(None)
        else:
            grad_source = torch.mul(grad, weight.unsqueeze(-1))
            grad_source.addcmul_(coef.unsqueeze(-1), query)
            grad_sources.append(grad_source.to(source.dtype))
    return grad_query, grad_inv_rms, grad_sources


class _FusedRoute(torch.autograd.Function):
    """route(sources) with the folded query; `tensors` is inv_rms_0 .. inv_rms_{S-1}, s_0 .. s_{S-1}.

    Every op here is elementwise or a reduction. None of them is on autocast's lower-precision list, so
    logits, softmax and sums stay in the wide dtype under autocast. The kernel avoids matrix-vector
    products on purpose, because MKL's `torch.mv` was slower than mul + sum on the benchmark CPU (see
    docs/benchmarks.md).
    """

    @staticmethod
    def forward(
        ctx: Any, query: Tensor, gradients: tuple[SourceGradient | None, ...] | None, *tensors: Tensor
    ) -> Tuple2:
        count = len(tensors) // 2
        inv_rms, sources = tensors[:count], tensors[count:]
        out, logits, weights = _mix_forward(query, inv_rms, sources)
        ctx.save_for_backward(query, logits, *inv_rms, *sources)
        ctx.gradients = gradients
        ctx.mark_non_differentiable(weights)
        ctx.set_materialize_grads(False)  # no (S, B, T) zeros for the weights, which get no gradient
        return out.to(_mix_dtype(sources)), weights

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor | None, _grad_weights: None) -> tuple[Tensor | None, ...]:
        query, logits, *tensors = ctx.saved_tensors
        count = len(tensors) // 2
        if grad_out is None:  # the mix was not used in the loss
            return (None,) * (2 + 2 * count)
        inv_rms, sources = tensors[:count], tensors[count:]
        weights = torch.softmax(logits, dim=0)  # recomputed: cheaper than saving a second (S, B, T)
        grad_query, grad_inv_rms, grad_sources = _mix_backward(
            ctx, grad_out.to(query.dtype), query, logits, weights, inv_rms, sources, 2 + count
        )
        return (grad_query, None, *grad_inv_rms, *grad_sources)


class _FusedRouteNorm(torch.autograd.Function):
    """weight * RMSNorm(route(sources)): `_FusedRoute` followed by the sublayer's pre-norm.

    The mix itself is not saved. Backward recomputes it from the sources and the logits, so a routed
    input costs one (B, T) inverse RMS instead of a (B, T, D) tensor.
    """

    @staticmethod
    def forward(
        ctx: Any,
        query: Tensor,
        gradients: tuple[SourceGradient | None, ...] | None,
        norm_weight: Tensor,
        eps: float,
        *tensors: Tensor,
    ) -> Tuple2:
        count = len(tensors) // 2
        inv_rms, sources = tensors[:count], tensors[count:]
        out, logits, weights = _mix_forward(query, inv_rms, sources)
        normed, norm_inv_rms = norm_forward(out.to(_mix_dtype(sources)), norm_weight, eps)
        ctx.save_for_backward(query, logits, norm_inv_rms, norm_weight, *inv_rms, *sources)
        ctx.gradients = gradients
        ctx.mark_non_differentiable(weights)
        ctx.set_materialize_grads(False)
        return normed, weights

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor | None, _grad_weights: None) -> tuple[Tensor | None, ...]:
        query, logits, norm_inv_rms, norm_weight, *tensors = ctx.saved_tensors
        count = len(tensors) // 2
        if grad_out is None:
            return (None,) * (4 + 2 * count)
        inv_rms, sources = tensors[:count], tensors[count:]
        weights = torch.softmax(logits, dim=0)
        mixed = _weighted_sum(weights, sources, torch.empty_like(grad_out, dtype=query.dtype))
        grad_mixed, grad_norm_weight = norm_backward(
            grad_out, mixed.to(_mix_dtype(sources)), norm_inv_rms, norm_weight, ctx.needs_input_grad[2]
        )
        grad_query, grad_inv_rms, grad_sources = _mix_backward(
            ctx, grad_mixed.to(query.dtype), query, logits, weights, inv_rms, sources, 4 + count
        )
        return (grad_query, None, grad_norm_weight, None, *grad_inv_rms, *grad_sources)


def _check_sources(sources: Sequence[Tensor], inv_rms: Sequence[Tensor]) -> None:
    if len(sources) != len(inv_rms) or not sources:
        raise ValueError(
            f"route needs one inverse RMS per source, got {len(sources)} sources and {len(inv_rms)}"
        )


def _folded_query(query: Tensor, gain: Tensor, sources: Sequence[Tensor]) -> Tensor:
    wide = _wide_dtype(sources[0].dtype)
    for tensor in (query, *sources):
        wide = torch.promote_types(wide, _wide_dtype(tensor.dtype))
    return (query * gain).to(wide)  # RMSNorm_key(s) . w == (g * w) . s / rms(s)


def _source_gradients(
    sources: Sequence[Tensor], inv_rms: Sequence[Tensor]
) -> tuple[SourceGradient | None, ...] | None:
    if torch.compiler.is_compiling():
        return None
    return tuple(_source_gradient(inv, source) for inv, source in zip(inv_rms, sources, strict=True))


# Largest S * B * T * D for which inference without autograd stacks the sources. Stacking launches a few
# ops per router instead of three per source, which dominates when decoding one token at a time, and a
# 1 Mi-element stack is 4 MiB in float32.
_STACKED_MAX_ELEMENTS = 2**20


def _use_stacked(sources: Sequence[Tensor]) -> bool:
    return not torch.is_grad_enabled() and len(sources) * sources[0].numel() <= _STACKED_MAX_ELEMENTS


def _stacked_mix(folded: Tensor, inv_rms: Sequence[Tensor], sources: Sequence[Tensor]) -> Tuple2:
    """Return the mix in the folded query's dtype and the weights, computed on stacked sources (no autograd)."""
    with torch.autocast(folded.device.type, enabled=False):  # keep the matmuls in the wide dtype
        stacked = torch.stack([source.to(folded.dtype) for source in sources])  # (S, B, T, D)
        logits = torch.matmul(stacked, folded) * torch.stack(list(inv_rms)).to(folded.dtype)  # (S, B, T)
        weights = torch.softmax(logits, dim=0)
        mixed = torch.einsum("sbt,sbtd->btd", weights, stacked)
    return mixed, weights


def route(query: Tensor, gain: Tensor, sources: Sequence[Tensor], inv_rms: Sequence[Tensor]) -> Tuple2:
    """Mix `sources` with softmax weights; return the mix and the weights (S, B, T).

    `inv_rms[i]` must be `inverse_rms(sources[i], eps)`. The mix has the promoted dtype of the sources,
    and the returned weights are detached float32 (float64 for float64 inputs).
    """
    _check_sources(sources, inv_rms)
    folded = _folded_query(query, gain, sources)
    if _use_stacked(sources):
        mixed, weights = _stacked_mix(folded, inv_rms, sources)
        return mixed.to(_mix_dtype(sources)), weights
    mixed, weights = _FusedRoute.apply(folded, _source_gradients(sources, inv_rms), *inv_rms, *sources)
    return mixed, weights


def route_norm(
    query: Tensor,
    gain: Tensor,
    sources: Sequence[Tensor],
    inv_rms: Sequence[Tensor],
    norm_weight: Tensor,
    norm_eps: float,
) -> Tuple2:
    """Return norm_weight * RMSNorm(mix) and the weights (S, B, T), without saving the mix for backward.

    Equal to `rms_norm(route(...)[0], norm_weight, norm_eps)`. It serves replacement routing, where the
    mix is read only by the sublayer's pre-norm.
    """
    _check_sources(sources, inv_rms)
    folded = _folded_query(query, gain, sources)
    if _use_stacked(sources):
        mixed, weights = _stacked_mix(folded, inv_rms, sources)
        return norm_forward(mixed.to(_mix_dtype(sources)), norm_weight, norm_eps)[0], weights
    gradients = _source_gradients(sources, inv_rms)
    normed, weights = _FusedRouteNorm.apply(folded, gradients, norm_weight, norm_eps, *inv_rms, *sources)
    return normed, weights


def naive_route(query: Tensor, gain: Tensor, sources: Sequence[Tensor], eps: float) -> Tuple2:
    """Reference router: stack, normalise every source, softmax in float32, weighted sum."""
    stacked = torch.stack(list(sources))  # (S, B, T, D)
    with torch.autocast(stacked.device.type, enabled=False):  # keep the einsums in float32
        wide = _widen(stacked)
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps) * _widen(gain)
        logits = torch.einsum("sbtd,d->sbt", normed, _widen(query))
        weights = torch.softmax(logits, dim=0)  # (S, B, T)
        mixed = torch.einsum("sbt,sbtd->btd", weights, wide)
    return mixed.to(stacked.dtype), weights.detach()
