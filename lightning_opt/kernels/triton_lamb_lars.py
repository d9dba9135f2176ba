"""LAMB's and LARS's Triton kernels: equal to :func:`lightning_opt.optim.lamb_lars.lamb_update_` and
:func:`~lightning_opt.optim.lamb_lars.lars_update_` per tensor.

With a trust ratio (``adapt``) a bucket takes three launches: per-block partial sums of the squared
norms, their per-tensor sums in block order (deterministic, no atomics), then the update; without
one, only the update (one launch). The trust ratios and LAMB's ``grad_scale`` (a device tensor, the
global clip factor) never leave the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_opt.kernels import triton_launcher as launcher
from lightning_opt.kernels.triton_common import address, block_of, device, div, hp, load, sqrt, store, update
from lightning_opt.optim.lamb_lars import lamb_scalars

__all__ = ["lamb_triton_", "lars_triton_"]


@device
def _sum_sq(x, mask):
    # squares accumulated in float64, as precision.tensor_norm (vector_norm(x, dtype=float64)) does
    x = tl.where(mask, x, 0.0).to(tl.float64)
    return tl.sum(x * x, axis=0)


@device
def _norm(SUMS, t, j, K: tl.constexpr, PK: tl.constexpr):
    # sqrt of the float64 sum of squares, rounded once to the compute dtype
    return hp(tl.sqrt(tl.load(SUMS + t * K + j)), PK)


@device
def _trust(num, den, w_norm, o_norm, PK: tl.constexpr):
    # lamb_lars.trust_ratio: num / den, or 1 where either norm is 0
    ok = (w_norm > 0) & (o_norm > 0)
    return tl.where(ok, div(num, tl.where(ok, den, 1.0), PK), 1.0)


# ---- LAMB (lists: params, grads, exp_avgs, exp_avg_sqs, kahan_comps)


@device
def _lamb_direction(
    PTRS, t, offs, mask, SCALE, scale, beta1, m_alpha, beta2, om_beta2, k, eps_q, weight_decay,
    L: tl.constexpr, PK: tl.constexpr, SK: tl.constexpr, SCALE_PTR: tl.constexpr, WD: tl.constexpr,
):
    if SCALE_PTR:
        s = tl.load(SCALE)
    else:
        s = hp(scale, PK)
    g = load(address(PTRS, t, 1, L), offs, mask, PK) * s
    m = load(address(PTRS, t, 2, L), offs, mask, SK)
    v = load(address(PTRS, t, 3, L), offs, mask, SK)
    m = tl.fma(g, hp(m_alpha, PK), m * hp(beta1, PK))
    v = tl.fma(hp(om_beta2, PK) * g, g, v * hp(beta2, PK))
    u = div(m * hp(k, PK), sqrt(v, PK) + hp(eps_q, PK), PK)  # lamb_scalars: (m k) / (sqrt(v) + eps_q)
    p = load(address(PTRS, t, 0, L), offs, mask, PK)
    if WD:
        u = tl.fma(p, hp(weight_decay, PK), u)  # u.add_(p32, alpha=weight_decay)
    return p, m, v, u


@triton.jit
def _lamb_partial(
    PTRS, SIZES, BLOCKS, PART, SEEDS,
    SCALE, scale: tl.float64, beta1: tl.float64, m_alpha: tl.float64, beta2: tl.float64, om_beta2: tl.float64,
    k: tl.float64, eps_q: tl.float64, weight_decay: tl.float64, lr: tl.float64,
    K: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr, PK: tl.constexpr, SK: tl.constexpr,
    SCALE_PTR: tl.constexpr, WD: tl.constexpr, ADAPT: tl.constexpr, TRUST_CLIP: tl.constexpr,
    KAHAN: tl.constexpr, SR: tl.constexpr,
):
    t, offs, mask = block_of(SIZES, BLOCKS, BLOCK)
    p, m, v, u = _lamb_direction(
        PTRS, t, offs, mask, SCALE, scale, beta1, m_alpha, beta2, om_beta2, k, eps_q, weight_decay,
        L, PK, SK, SCALE_PTR, WD,
    )
    pid = tl.program_id(0)
    tl.store(PART + pid * K, _sum_sq(p, mask))
    tl.store(PART + pid * K + 1, _sum_sq(u, mask))


@triton.jit
def _lamb_apply(
    PTRS, SIZES, BLOCKS, SUMS, OUT, SEEDS,
    SCALE, scale: tl.float64, beta1: tl.float64, m_alpha: tl.float64, beta2: tl.float64, om_beta2: tl.float64,
    k: tl.float64, eps_q: tl.float64, weight_decay: tl.float64, lr: tl.float64,
    K: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr, PK: tl.constexpr, SK: tl.constexpr,
    SCALE_PTR: tl.constexpr, WD: tl.constexpr, ADAPT: tl.constexpr, TRUST_CLIP: tl.constexpr,
    KAHAN: tl.constexpr, SR: tl.constexpr,
):
    t, offs, mask = block_of(SIZES, BLOCKS, BLOCK)
    p, m, v, u = _lamb_direction(
        PTRS, t, offs, mask, SCALE, scale, beta1, m_alpha, beta2, om_beta2, k, eps_q, weight_decay,
        L, PK, SK, SCALE_PTR, WD,
    )
    store(address(PTRS, t, 2, L), offs, m, mask, SK)
    store(address(PTRS, t, 3, L), offs, v, mask, SK)
    if ADAPT:
        w_norm = _norm(SUMS, t, 0, K, PK)
        u_norm = _norm(SUMS, t, 1, K, PK)
        ratio = _trust(w_norm, u_norm, w_norm, u_norm, PK)
        if TRUST_CLIP:
            ratio = tl.minimum(ratio, 1.0)
        u = u * ratio
    update(address(PTRS, t, 0, L), address(PTRS, t, 4, L), offs, mask, p, u * (-hp(lr, PK)), PK, KAHAN, SR, SEEDS, t)


def lamb_triton_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    kahan_comps: Sequence[Tensor | None],
    steps: Sequence[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: Tensor | float = 1.0,
    bias_correction: bool = True,
    grad_averaging: bool = True,
    adapt: bool = True,
    trust_clip: bool = False,
    stochastic: bool = False,
) -> None:
    """LAMB over one bucket; equals ``lamb_update_`` per tensor (the signature of ``LAMB_IMPLS``).

    ``steps``: each tensor's 1-based step (one pass per distinct step: one in the usual case);
    ``grad_scale``: the global clip factor, a 0-d tensor (read on the device, no host sync) or a
    float. Three launches with ``adapt``, one without. ``stochastic`` rounds bf16 parameters
    stochastically, seeded by each tensor's step.
    """
    if not params:
        return
    pk = launcher.kind(params[0].dtype)
    compute = torch.float64 if pk == 1 else torch.float32
    grads = launcher.same_dtype(grads, params[0].dtype)
    comps = list(kahan_comps) if kahan_comps else [None] * len(params)
    if isinstance(grad_scale, Tensor):
        scale_t, scale_f = grad_scale.detach().reshape(()).to(params[0].device, compute), 1.0
    else:
        scale_t, scale_f = params[0], float(grad_scale)
    sr = bool(stochastic) and pk == 2
    for step, idx in launcher.by_value(list(steps)):
        k, eps_q = lamb_scalars(step, beta1, beta2, eps, bias_correction)
        seeds = launcher.seed_table(sr, [step] * len(idx), len(idx), params[0].device)
        lists = [launcher.pick(x, idx) for x in (params, grads, exp_avgs, exp_avg_sqs, comps)]
        scalars = (
            seeds, scale_t, scale_f, beta1, (1 - beta1) if grad_averaging else 1.0, beta2, 1 - beta2,
            k, eps_q, weight_decay, lr,
        )
        cx = dict(
            PK=pk,
            SK=launcher.kind(exp_avgs[0].dtype),
            SCALE_PTR=isinstance(grad_scale, Tensor),
            WD=weight_decay != 0,
            ADAPT=bool(adapt),
            TRUST_CLIP=bool(trust_clip),
            KAHAN=comps[0] is not None,
            SR=sr,
        )
        if adapt:
            launcher.reduce_then_apply(_lamb_partial, _lamb_apply, lists, scalars, k=2, **cx)
        else:
            # no sums: the apply kernel alone, its SUMS/OUT unused
            launcher.elementwise(_lamb_apply, lists, (params[0], params[0], *scalars), K=2, **cx)


# ---- LARS (lists: params, grads, momentum_buffers, kahan_comps)


@triton.jit
def _lars_partial(
    PTRS, SIZES, BLOCKS, PART, SEEDS,
    lr: tl.float64, momentum: tl.float64, om_dampening: tl.float64, weight_decay: tl.float64,
    trust_coeff: tl.float64, eps: tl.float64,
    K: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr, PK: tl.constexpr, WD: tl.constexpr,
    ADAPT: tl.constexpr, TRUST_CLIP: tl.constexpr, MOMENTUM: tl.constexpr, FRESH: tl.constexpr,
    NESTEROV: tl.constexpr, KAHAN: tl.constexpr, SR: tl.constexpr,
):
    t, offs, mask = block_of(SIZES, BLOCKS, BLOCK)
    p = load(address(PTRS, t, 0, L), offs, mask, PK)
    g = load(address(PTRS, t, 1, L), offs, mask, PK)
    pid = tl.program_id(0)
    tl.store(PART + pid * K, _sum_sq(p, mask))
    tl.store(PART + pid * K + 1, _sum_sq(g, mask))


@triton.jit
def _lars_apply(
    PTRS, SIZES, BLOCKS, SUMS, OUT, SEEDS,
    lr: tl.float64, momentum: tl.float64, om_dampening: tl.float64, weight_decay: tl.float64,
    trust_coeff: tl.float64, eps: tl.float64,
    K: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr, PK: tl.constexpr, WD: tl.constexpr,
    ADAPT: tl.constexpr, TRUST_CLIP: tl.constexpr, MOMENTUM: tl.constexpr, FRESH: tl.constexpr,
    NESTEROV: tl.constexpr, KAHAN: tl.constexpr, SR: tl.constexpr,
):
    t, offs, mask = block_of(SIZES, BLOCKS, BLOCK)
    P = address(PTRS, t, 0, L)
    p = load(P, offs, mask, PK)
    d = load(address(PTRS, t, 1, L), offs, mask, PK)
    if WD:
        d = tl.fma(p, hp(weight_decay, PK), d)  # d.add_(p32, alpha=weight_decay)
    if ADAPT:
        w_norm = _norm(SUMS, t, 0, K, PK)
        g_norm = _norm(SUMS, t, 1, K, PK)
        num = hp(trust_coeff, PK) * w_norm
        den = (g_norm + hp(weight_decay, PK) * w_norm) + hp(eps, PK)
        ratio = _trust(num, den, w_norm, g_norm, PK)
        if TRUST_CLIP:
            ratio = tl.minimum(div(ratio, hp(lr, PK), PK), 1.0)
        d = d * ratio
    if MOMENTUM:
        B = address(PTRS, t, 2, L)
        if FRESH:
            buf = d  # the first step's buffer is the direction itself
        else:
            buf = tl.fma(d, hp(om_dampening, PK), load(B, offs, mask, PK) * hp(momentum, PK))
        store(B, offs, buf, mask, PK)
        if NESTEROV:
            d = tl.fma(buf, hp(momentum, PK), d)
        else:
            d = buf
    update(P, address(PTRS, t, 3, L), offs, mask, p, d * (-hp(lr, PK)), PK, KAHAN, SR, SEEDS, t)


def lars_triton_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    kahan_comps: Sequence[Tensor | None],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    trust_coeff: float,
    eps: float,
    adapt: bool = True,
    trust_clip: bool = False,
    stochastic: bool = False,
    steps: Sequence[int] | None = None,
) -> list[Tensor | None]:
    """LARS over one bucket; equals ``lars_update_`` per tensor (the signature of ``LARS_IMPLS``).

    Returns the momentum buffers (new ones, in the parameters' dtype, where ``momentum_buffers`` had
    ``None``; all ``None`` without momentum). Three launches with ``adapt``, one without (twice that
    on the step where some tensors get their first buffer and others already have one).
    ``stochastic`` rounds bf16 parameters stochastically, seeded by each tensor's ``steps`` entry.
    """
    if not params:
        return []
    pk = launcher.kind(params[0].dtype)
    grads = launcher.same_dtype(grads, params[0].dtype)
    comps = list(kahan_comps) if kahan_comps else [None] * len(params)
    buffers: list[Tensor | None] = list(momentum_buffers) if momentum_buffers else [None] * len(params)
    # with trust_clip and lr <= 0 the reference's ratio is 1: no adaptation
    adapt = bool(adapt) and not (trust_clip and lr <= 0)
    fresh = [momentum != 0 and b is None for b in buffers]
    if momentum != 0:
        buffers = [
            torch.empty_like(p, memory_format=torch.contiguous_format) if b is None else b
            for p, b in zip(params, buffers)
        ]
    sr = bool(stochastic) and pk == 2
    for is_fresh, idx in launcher.by_value(fresh):
        lists = [launcher.pick(x, idx) for x in (params, grads, buffers, comps)]
        picked = None if steps is None else launcher.pick(steps, idx)
        seeds = launcher.seed_table(sr, picked, len(idx), params[0].device)
        scalars = (seeds, lr, momentum, 1 - dampening, weight_decay, trust_coeff, eps)
        cx = dict(
            PK=pk,
            WD=weight_decay != 0,
            ADAPT=adapt,
            TRUST_CLIP=bool(trust_clip),
            MOMENTUM=momentum != 0,
            FRESH=is_fresh,
            NESTEROV=bool(nesterov),
            KAHAN=comps[0] is not None,
            SR=sr,
        )
        if adapt:
            launcher.reduce_then_apply(_lars_partial, _lars_apply, lists, scalars, k=2, **cx)
        else:
            launcher.elementwise(_lars_apply, lists, (params[0], params[0], *scalars), K=2, **cx)
    return buffers
