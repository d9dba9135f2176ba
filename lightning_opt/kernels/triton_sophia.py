"""Sophia's Triton kernel: one launch per bucket, equal to :func:`lightning_opt.optim.sophia.sophia_update_`."""

from __future__ import annotations

from collections.abc import Sequence

import triton
import triton.language as tl
from torch import Tensor

from lightning_opt.kernels import triton_launcher as launcher
from lightning_opt.kernels.triton_common import address, block_of, div, hp, load, round_to, store, update

__all__ = ["sophia_triton_"]


@triton.jit
def _sophia_kernel(
    PTRS,
    SIZES,
    BLOCKS,
    SEEDS,
    lr: tl.float64,
    beta1: tl.float64,
    one_minus_beta1: tl.float64,
    scale: tl.float64,
    eps: tl.float64,
    decay: tl.float64,
    L: tl.constexpr,
    BLOCK: tl.constexpr,
    PK: tl.constexpr,
    GK: tl.constexpr,
    SK: tl.constexpr,
    WD: tl.constexpr,
    KAHAN: tl.constexpr,
    SR: tl.constexpr,
):
    t, offs, mask = block_of(SIZES, BLOCKS, BLOCK)
    P = address(PTRS, t, 0, L)
    M = address(PTRS, t, 2, L)
    p = load(P, offs, mask, PK)
    if WD:
        p = round_to(p * hp(decay, PK), PK)  # param.mul_(1 - lr wd), outside the compensation
    # the math runs in exp_avg's dtype (float32 for bf16/fp16 parameters)
    g = round_to(load(address(PTRS, t, 1, L), offs, mask, GK), SK)
    m = round_to(load(M, offs, mask, SK) * hp(beta1, SK), SK)
    m = round_to(tl.fma(g, hp(one_minus_beta1, SK), m), SK)
    store(M, offs, m, mask, SK)
    h = load(address(PTRS, t, 3, L), offs, mask, SK)
    denom = tl.maximum(round_to(h * hp(scale, SK), SK), hp(eps, SK))
    ratio = tl.minimum(div(tl.abs(m), denom, SK), 1.0)
    sign = tl.where(m > 0, 1.0, tl.where(m < 0, -1.0, 0.0)).to(m.dtype)
    update(P, address(PTRS, t, 4, L), offs, mask, p, (ratio * sign) * (-hp(lr, SK)), PK, KAHAN, SR, SEEDS, t)


def sophia_triton_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    hessians: Sequence[Tensor],
    kahan_comps: Sequence[Tensor | None],
    *,
    lr: float,
    beta1: float,
    scale: float,
    eps: float,
    weight_decay: float,
    stochastic: bool = False,
    steps: Sequence[int] | None = None,
) -> None:
    """Sophia over one bucket in one Triton launch; equals ``sophia_update_`` per tensor.

    ``scale`` is ``rho * bs`` (SophiaG) or ``rho`` (SophiaH); ``exp_avgs``/``hessians`` float32 for
    bf16/fp16 parameters (or the parameters' dtype); ``kahan_comps`` all buffers or all ``None``;
    ``stochastic`` rounds bf16 parameters stochastically (``precision.apply_update_``), seeded by each
    tensor's ``steps`` entry (its step count).
    """
    if not params:
        return
    pk = launcher.kind(params[0].dtype)
    grads = launcher.same_dtype(grads, grads[0].dtype)
    comps = list(kahan_comps) if kahan_comps else [None] * len(params)
    sr = bool(stochastic) and pk == 2
    launcher.elementwise(
        _sophia_kernel,
        [params, grads, exp_avgs, hessians, comps],
        (launcher.seed_table(sr, steps, len(params), params[0].device), lr, beta1, 1.0 - beta1, scale, eps,
         1.0 - lr * weight_decay),
        PK=pk,
        GK=launcher.kind(grads[0].dtype),
        SK=launcher.kind(exp_avgs[0].dtype),
        WD=weight_decay != 0,
        KAHAN=comps[0] is not None,
        SR=sr,
    )
