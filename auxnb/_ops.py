"""`cat` and `stack` whose backward is one `split` / `unbind` node (internal).

``torch.cat`` and ``torch.stack`` give each input its gradient through its own ``narrow`` /
``select`` of the output's gradient. That is cheap in a first-order backward, but a second-order
graph (``create_graph=True``: the upper step's Hessian-vector products) records those K views, and
the backward of each one fills a zero tensor the size of the whole output. With K inputs that is
K² work: with CUB's 312 attribute heads, about a third of every Hessian-vector product.

Here the backward is ``grad.split(sizes, dim)`` / ``grad.unbind(dim)``: the same views, so the same
values, recorded as one node whose own backward is one ``cat`` / ``stack``. Both stay twice
differentiable (no ``once_differentiable``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["cat", "stack"]


class _Cat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dim: int, *tensors: Tensor) -> Tensor:
        ctx.dim = dim
        ctx.sizes = [t.shape[dim] for t in tensors]
        return torch.cat(tensors, dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (None, *grad.split(ctx.sizes, ctx.dim))


class _Stack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dim: int, *tensors: Tensor) -> Tensor:
        ctx.dim = dim
        return torch.stack(tensors, dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (None, *grad.unbind(ctx.dim))


def _plain(tensors: Sequence[Tensor]) -> bool:
    """torch's own op is used when no input needs a gradient or the inputs differ in dtype/device
    (torch's backward casts each gradient back to its input's dtype)."""
    t0 = tensors[0]
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or any(
        t.dtype != t0.dtype or t.device != t0.device for t in tensors
    )


def cat(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    """``torch.cat(tensors, dim)`` with a one-node (``split``) backward. Same values and gradients."""
    tensors = list(tensors)
    if _plain(tensors):
        return torch.cat(tensors, dim)
    return _Cat.apply(dim % tensors[0].dim(), *tensors)


def stack(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    """``torch.stack(tensors, dim)`` with a one-node (``unbind``) backward. Same values and gradients."""
    tensors = list(tensors)
    if _plain(tensors):
        return torch.stack(tensors, dim)
    return _Stack.apply(dim % (tensors[0].dim() + 1), *tensors)
