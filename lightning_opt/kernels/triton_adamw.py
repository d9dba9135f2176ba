"""The AdamW side's Triton kernel (Muon, APOLLO): equal to :func:`lightning_opt.optim.base.adamw_update_`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_opt.kernels import triton_launcher as launcher
from lightning_opt.kernels.triton_common import address, block_of, div, hp, load, sqrt, store

__all__ = ["adamw_triton_", "lerp_coefficient"]


def lerp_coefficient(weight: float, dtype: torch.dtype) -> tuple[float, float]:
    """``(coefficient, from_end)`` of torch's ``lerp_(end, weight)`` with ``weight`` in ``dtype``.

    torch computes ``fma(w, end - start, start)`` for ``|w| < 0.5`` and ``fma(w - 1, end - start, end)``
    otherwise (``w - 1`` is exact); ``from_end`` (1.0 or 0.0) says which form.
    """
    w = weight if dtype == torch.float64 else float(torch.tensor(weight, dtype=torch.float32))
    return (w, 0.0) if abs(w) < 0.5 else (w - 1.0, 1.0)


@triton.jit
def _adamw_kernel(
    PTRS,
    SIZES,
    BLOCKS,
    lerp_w: tl.float64,
    lerp_from_end: tl.float64,
    beta2: tl.float64,
    one_minus_beta2: tl.float64,
    sqrt_bc2: tl.float64,
    eps: tl.float64,
    decay: tl.float64,
    step_size: tl.float64,
    L: tl.constexpr,
    BLOCK: tl.constexpr,
    PK: tl.constexpr,
    GK: tl.constexpr,
    SK: tl.constexpr,
    WD: tl.constexpr,
):
    t, offs, mask = block_of(SIZES, BLOCKS, BLOCK)
    P = address(PTRS, t, 0, L)
    M = address(PTRS, t, 2, L)
    V = address(PTRS, t, 3, L)
    g = load(address(PTRS, t, 1, L), offs, mask, GK)
    m = load(M, offs, mask, SK)
    v = load(V, offs, mask, SK)
    w = hp(lerp_w, PK)
    m = tl.fma(w, g - m, tl.where(lerp_from_end != 0, g, m))  # exp_avg.lerp_(g, 1 - beta1)
    v = tl.fma(hp(one_minus_beta2, PK) * g, g, v * hp(beta2, PK))  # mul_(beta2).addcmul_(g, g, 1 - beta2)
    store(M, offs, m, mask, SK)
    store(V, offs, v, mask, SK)
    denom = div(sqrt(v, PK), hp(sqrt_bc2, PK), PK) + hp(eps, PK)
    p = load(P, offs, mask, PK)
    if WD:
        p = p * hp(decay, PK)  # float32 for bf16 parameters: rounded once, with the update
    store(P, offs, p + div(hp(step_size, PK) * m, denom, PK), mask, PK)


def adamw_triton_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """The AdamW side over one bucket in one Triton launch; equals ``base.adamw_update_`` per tensor.

    Signature of ``_hybrid.adamw_side``'s implementations: ``steps`` is each tensor's 1-based step
    (one launch per distinct step: one in the usual case); the moments are float32 for bf16/fp16
    parameters (or the parameters' dtype). ``p *= 1 - lr wd`` then ``p += -lr/bc1 m / (sqrt(v)/sqrt(bc2) + eps)``,
    rounded once into a bf16 parameter.
    """
    if not params:
        return
    pk = launcher.kind(params[0].dtype)
    grads = launcher.same_dtype(grads, grads[0].dtype)
    for step, idx in launcher.by_value(list(steps)):
        bc1 = 1 - beta1**step
        launcher.elementwise(
            _adamw_kernel,
            [launcher.pick(x, idx) for x in (params, grads, exp_avgs, exp_avg_sqs)],
            (
                *lerp_coefficient(1 - beta1, torch.float64 if pk == 1 else torch.float32),
                beta2,
                1 - beta2,
                math.sqrt(1 - beta2**step),
                eps,
                1 - lr * weight_decay,
                -lr / bc1,
            ),
            PK=pk,
            GK=launcher.kind(grads[0].dtype),
            SK=launcher.kind(exp_avgs[0].dtype),
            WD=weight_decay != 0,
        )
