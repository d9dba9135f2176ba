"""Auxiliary losses for training stability.

- :func:`z_loss`: PaLM's output z-loss (Chowdhery et al. 2022, arXiv:2204.02311, section 5), which
  pushes the softmax normalizer ``log Z = logsumexp(logits)`` towards 0 so the logits do not drift;
  ST-MoE's router z-loss (Zoph et al. 2022, arXiv:2202.08906, eq. 5) is the same formula over a
  router's logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_opt.optim.base import is_number

__all__ = ["z_loss"]


def z_loss(logits: Tensor, weight: float = 1e-4) -> Tensor:
    """``weight * mean(logsumexp(logits, dim=-1) ** 2)``: the z-loss over the last dimension.

    The mean runs over every other dimension (tokens, or tokens x experts' rows for a router).
    Stable for bf16/fp16 logits: they are upcast to float32 before the ``logsumexp`` (which itself
    subtracts the maximum), and the result is float32 (float64 for float64 logits), so it adds to
    a float32 cross-entropy without a second rounding to the input's 8-bit mantissa. Gradients flow
    back in the logits' dtype (``d/dx = 2 weight lse softmax(x) / n``).

    Args:
        logits: ``(..., classes)`` floating-point logits (LM head output, or router logits
            ``(tokens, experts)``).
        weight: the loss coefficient, finite and >= 0 (default ``1e-4``, PaLM's and a common
            LM choice; ST-MoE uses ``1e-3`` for the router).

    Returns:
        A 0-dim tensor, float32 (float64 for float64 logits).

    Raises:
        ValueError: ``weight`` is negative or not finite, ``logits`` is not floating point or has
            no elements (no classes, or no rows to average over).

    Example:
        >>> logits = model(x)                       # (batch, seq, vocab)
        >>> loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()) + z_loss(logits, 1e-4)
    """
    if not (is_number(weight) and weight >= 0):
        raise ValueError(f"z_loss(weight={weight!r}) is invalid; it must be a finite number >= 0")
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        what = logits.dtype if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"z_loss(logits) needs a floating-point tensor, got {what}")
    if logits.ndim == 0 or logits.numel() == 0:
        raise ValueError(f"z_loss(logits) needs logits of shape (..., classes) with elements, got shape {tuple(logits.shape)}")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lse = torch.logsumexp(logits.to(dtype), dim=-1)
    return weight * lse.square().mean()
