"""Kahan-compensated parameter updates and fp32 compute for low-precision parameters.

A bfloat16 weight has an 8-bit significand, so an update smaller than about ``2**-9 * |p|`` rounds
away and training with ``precision="bf16-true"`` silently stalls. Kahan summation keeps the part of
each update that rounding lost in a compensation buffer (same dtype as the parameter) and adds it
back on the next step (Zamirai et al. 2020, "Revisiting BFloat16 Training", arXiv:2010.06192; the
same scheme as torch-optimi's ``kahan_sum``).

These are plain functions of tensors so that every elementwise optimizer (and a later fused kernel)
applies the same arithmetic.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_opt.optim.base import LOW_PRECISION, compute_dtype

__all__ = ["LOW_PRECISION", "apply_update_", "compute_dtype", "kahan_add_", "new_kahan_comp"]


def new_kahan_comp(param: Tensor) -> Tensor | None:
    """A zero compensation buffer for ``param`` if it is bf16/fp16, else ``None`` (fp32 needs none)."""
    if param.dtype in LOW_PRECISION:
        return torch.zeros_like(param, memory_format=torch.preserve_format)
    return None


def kahan_add_(param: Tensor, delta: Tensor, comp: Tensor) -> None:
    """``param += delta`` with Kahan compensation; ``comp`` carries the rounding error across calls.

    Args:
        param: the (low-precision) parameter, updated in place.
        delta: the update to add, in any floating dtype (usually float32); not modified.
        comp: compensation buffer of ``param``'s shape and dtype, updated in place.

    The sequence is ``c += delta; old = p; p += c; c += old - p``: after it, ``p + c`` equals the
    exactly accumulated sum up to the rounding of ``c`` itself, so updates below ``p``'s resolution
    accumulate in ``c`` until they move ``p``.
    """
    comp.add_(delta)
    old = param.detach().clone()
    param.add_(comp)
    comp.add_(old.sub_(param))


def apply_update_(param: Tensor, delta: Tensor, comp: Tensor | None) -> None:
    """``param += delta``, Kahan-compensated when ``comp`` is a buffer, plain otherwise."""
    if comp is not None:
        kahan_add_(param, delta, comp)
    else:
        param.add_(delta)  # computed in the wider dtype, rounded once to param's
