"""RMSNorm as one autograd node that saves only its input and the inverse RMS.

Composed from PyTorch ops, y = g * x / sqrt(mean(x^2) + eps) keeps the normalised tensor x / rms(x) for
the backward of the gain product, a (B, T, D) tensor per norm on top of the input. `rms_norm` saves
the input and the (B, T, 1) inverse RMS and recomputes the normalised tensor in backward. Its forward
runs the same ops in the same order as the composed version, so outputs are bitwise equal.

`norm_forward` and `norm_backward` are shared with the fused route-and-norm kernel in `routing.py`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def norm_forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Return weight * RMSNorm(x) in the promoted dtype of weight and x, and the inverse RMS (..., 1).

    The statistics are computed in float32 (or float64 for float64 input), and the normalised tensor is
    cast back to x's dtype before the gain multiplies it, as in the Hugging Face Llama RMSNorm.
    """
    wide = x.to(_compute_dtype(x.dtype))
    inv_rms = torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (wide * inv_rms).to(x.dtype), inv_rms


def norm_backward(
    grad_y: Tensor, x: Tensor, inv_rms: Tensor, weight: Tensor, weight_needs_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Return the gradients of `norm_forward` w.r.t. x (in the compute dtype) and the weight.

    With n = x * r and r = (mean(x^2) + eps)^(-1/2), dr/dx_j = -r^3 x_j / D, so the input gradient
    is r * (g_n - n * mean(g_n * n)), where g_n = grad_y * weight.
    """
    wide_dtype = _compute_dtype(x.dtype)
    normed = x.to(wide_dtype) * inv_rms
    grad_weight = None
    if weight_needs_grad:
        product = grad_y * normed.to(x.dtype)
        grad_weight = product.flatten(0, -2).sum(0).to(weight.dtype)
    grad_normed = grad_y.to(wide_dtype) * weight.to(wide_dtype)
    projection = (grad_normed * normed).mean(-1, keepdim=True)
    grad_x = grad_normed.sub_(normed.mul_(projection)).mul_(inv_rms)
    return grad_x, grad_weight


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        y, inv_rms = norm_forward(x, weight, eps)
        ctx.save_for_backward(x, inv_rms, weight)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, inv_rms, weight = ctx.saved_tensors
        grad_x, grad_weight = norm_backward(grad_y, x, inv_rms, weight, ctx.needs_input_grad[1])
        return (grad_x.to(x.dtype) if ctx.needs_input_grad[0] else None), grad_weight, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Return weight * x / sqrt(mean(x^2) + eps) over the last dimension (see the module docstring)."""
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        return norm_forward(x, weight, eps)[0]
    return _RMSNorm.apply(x, weight, eps)
