"""Lion's Triton kernel: one launch per bucket, equal to :func:`lightning_opt.optim.lion.lion_update_`."""

from __future__ import annotations

from collections.abc import Sequence

import triton
import triton.language as tl
from torch import Tensor

from lightning_opt.kernels import triton_launcher as launcher
from lightning_opt.kernels.triton_common import address, block_of, hp, load, round_to, store, update

__all__ = ["lion_triton_"]


@triton.jit
def _lion_kernel(
    PTRS,
    SIZES,
    BLOCKS,
    SEEDS,
    lr: tl.float64,
    beta1: tl.float64,
    one_minus_beta1: tl.float64,
    beta2: tl.float64,
    one_minus_beta2: tl.float64,
    decay: tl.float64,
    L: tl.constexpr,
    BLOCK: tl.constexpr,
    PK: tl.constexpr,
    SK: tl.constexpr,
    WD: tl.constexpr,
    KAHAN: tl.constexpr,
    SR: tl.constexpr,
):
    t, offs, mask = block_of(SIZES, BLOCKS, BLOCK)
    P = address(PTRS, t, 0, L)
    M = address(PTRS, t, 2, L)
    p = load(P, offs, mask, PK)
    g = load(address(PTRS, t, 1, L), offs, mask, PK)
    m = load(M, offs, mask, SK)
    if WD:
        # param.mul_(1 - lr wd) is stored before the update is added
        p = round_to(p * hp(decay, PK), PK)
    # torch's add_(x, alpha=a) is one fused multiply-add, on the CPU and on CUDA
    u = tl.fma(g, hp(one_minus_beta1, PK), m * hp(beta1, PK))
    s = tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, tl.where(u != u, u, 0.0))).to(u.dtype)
    store(M, offs, tl.fma(g, hp(one_minus_beta2, PK), m * hp(beta2, PK)), mask, SK)
    update(P, address(PTRS, t, 3, L), offs, mask, p, s * (-hp(lr, PK)), PK, KAHAN, SR, SEEDS, t)


def lion_triton_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    kahan_comps: Sequence[Tensor | None],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    stochastic: bool = False,
    steps: Sequence[int] | None = None,
) -> None:
    """Lion over one bucket (one device and dtype) in one Triton launch; equals ``lion_update_`` per tensor.

    ``kahan_comps`` is all buffers (bf16/fp16 parameters with ``kahan_sum``) or all ``None``;
    ``stochastic`` rounds bfloat16 parameters stochastically (ignored for other dtypes, as in
    ``precision.apply_update_``) with bits seeded by each tensor's ``steps`` entry (its step count).
    """
    if not params:
        return
    pk = launcher.kind(params[0].dtype)
    kahan = kahan_comps[0] is not None if kahan_comps else False
    sr = bool(stochastic) and pk == 2
    launcher.elementwise(
        _lion_kernel,
        [params, grads, exp_avgs, kahan_comps if kahan_comps else [None] * len(params)],
        (launcher.seed_table(sr, steps, len(params), params[0].device), lr, beta1, 1 - beta1, beta2, 1 - beta2,
         1 - lr * weight_decay),
        PK=pk,
        SK=launcher.kind(exp_avgs[0].dtype),
        WD=weight_decay != 0,
        KAHAN=kahan,
        SR=sr,
    )
