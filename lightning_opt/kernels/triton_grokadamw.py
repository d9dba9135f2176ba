"""GrokAdamW's Triton kernels: equal to :func:`lightning_opt.optim.grokadamw.grokadamw_update_` per tensor.

With per-tensor gradient clipping (``gradient_clipping > 0``) a bucket takes three launches
(partial sums of ``g^2``, per-tensor sums in block order, the update); without, one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import triton
import triton.language as tl
from torch import Tensor

from lightning_opt.kernels import triton_launcher as launcher
from lightning_opt.kernels.triton_common import address, block_of, div, hp, load, round_to, sqrt, store, update

__all__ = ["grokadamw_triton_"]

# torch.nn.utils.clip_grad_norm_'s epsilon, as grokadamw._CLIP_EPS
_CLIP_EPS = 1e-6


@triton.jit
def _grok_partial(
    PTRS, SIZES, BLOCKS, PART, SEEDS,
    BETAS, lr: tl.float64, beta2: tl.float64, om_beta2: tl.float64, eps: tl.float64, decay: tl.float64,
    alpha: tl.float64, om_alpha: tl.float64, lamb: tl.float64, clip: tl.float64, clip_eps: tl.float64,
    step_size: tl.float64,
    K: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr, PK: tl.constexpr, SK: tl.constexpr,
    WD: tl.constexpr, CLIP: tl.constexpr, KAHAN: tl.constexpr, SR: tl.constexpr,
):
    t, offs, mask = block_of(SIZES, BLOCKS, BLOCK)
    g = load(address(PTRS, t, 1, L), offs, mask, PK).to(tl.float64)
    # squares accumulated in float64, as the reference's vector_norm(g, dtype=float64)
    tl.store(PART + tl.program_id(0) * K, tl.sum(g * g, axis=0))


@triton.jit
def _grok_apply(
    PTRS, SIZES, BLOCKS, SUMS, OUT, SEEDS,
    BETAS, lr: tl.float64, beta2: tl.float64, om_beta2: tl.float64, eps: tl.float64, decay: tl.float64,
    alpha: tl.float64, om_alpha: tl.float64, lamb: tl.float64, clip: tl.float64, clip_eps: tl.float64,
    step_size: tl.float64,
    K: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr, PK: tl.constexpr, SK: tl.constexpr,
    WD: tl.constexpr, CLIP: tl.constexpr, KAHAN: tl.constexpr, SR: tl.constexpr,
):
    t, offs, mask = block_of(SIZES, BLOCKS, BLOCK)
    g = load(address(PTRS, t, 1, L), offs, mask, PK)
    if CLIP:
        norm = hp(tl.sqrt(tl.load(SUMS + t * K)), PK)
        # torch computes clip / tensor as reciprocal(tensor) * clip: the same two roundings here
        g = g * tl.minimum(div(hp(1.0, PK), norm + hp(clip_eps, PK), PK) * hp(clip, PK), 1.0)
    M = address(PTRS, t, 2, L)
    V = address(PTRS, t, 3, L)
    E = address(PTRS, t, 4, L)
    e = tl.fma(g, hp(om_alpha, PK), load(E, offs, mask, SK) * hp(alpha, PK))  # e.mul_(alpha).add_(g, 1 - alpha)
    h = tl.fma(e, hp(lamb, PK), g)  # g.add_(e, alpha=lamb)
    # this tensor's layer-wise beta1 and 1 - beta1 (computed in double on the host)
    b1 = hp(tl.load(BETAS + 2 * t), PK)
    om_b1 = hp(tl.load(BETAS + 2 * t + 1), PK)
    m = tl.fma(h, om_b1, load(M, offs, mask, SK) * b1)
    v = tl.fma(hp(om_beta2, PK) * h, h, load(V, offs, mask, SK) * hp(beta2, PK))
    store(M, offs, m, mask, SK)
    store(V, offs, v, mask, SK)
    store(E, offs, e, mask, SK)
    P = address(PTRS, t, 0, L)
    p = load(P, offs, mask, PK)
    if WD:
        p = round_to(p * hp(decay, PK), PK)  # param.mul_(1 - lr wd)
    delta = div(m, sqrt(v, PK) + hp(eps, PK), PK) * (-hp(step_size, PK))
    update(P, address(PTRS, t, 5, L), offs, mask, p, delta, PK, KAHAN, SR, SEEDS, t)


def grokadamw_triton_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    grok_emas: Sequence[Tensor],
    kahan_comps: Sequence[Tensor | None],
    steps: Sequence[int],
    layer_beta1s: Sequence[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    alpha: float,
    lamb: float,
    gradient_clipping: float,
    stochastic: bool = False,
) -> None:
    """GrokAdamW over one bucket; equals ``grokadamw_update_`` per tensor (``GROKADAMW_IMPLS``' signature).

    ``beta1`` is the group's beta1, the bias correction's (``grokadamw_update_``'s ``bias_beta1``);
    each tensor's EMA uses its entry of ``layer_beta1s``.

    ``steps`` (1-based) and ``layer_beta1s`` (``beta1 (1 - gamma)**i``) are per tensor, so they are
    lists (the engine slices lists per bucket, not keyword arguments); one pass per distinct step
    (one in the usual case): three launches with ``gradient_clipping > 0``, one without.
    ``kahan_comps`` all buffers or all ``None``; ``stochastic`` rounds bf16 parameters stochastically,
    seeded by each tensor's step.
    """
    if not params:
        return
    pk = launcher.kind(params[0].dtype)
    grads = launcher.same_dtype(grads, params[0].dtype)
    comps = list(kahan_comps) if kahan_comps else [None] * len(params)
    device = params[0].device
    sr = bool(stochastic) and pk == 2
    for step, idx in launcher.by_value(list(steps)):
        seeds = launcher.seed_table(sr, [step] * len(idx), len(idx), device)
        betas = [x for i in idx for x in (layer_beta1s[i], 1.0 - layer_beta1s[i])]
        table = launcher.scalar_table(betas, device)
        step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        lists = [launcher.pick(x, idx) for x in (params, grads, exp_avgs, exp_avg_sqs, grok_emas, comps)]
        scalars = (
            seeds, table, lr, beta2, 1 - beta2, eps, 1 - lr * weight_decay, alpha, 1 - alpha, lamb,
            gradient_clipping, _CLIP_EPS, step_size,
        )
        cx = dict(
            PK=pk,
            SK=launcher.kind(exp_avgs[0].dtype),
            WD=weight_decay != 0,
            CLIP=gradient_clipping > 0,
            KAHAN=comps[0] is not None,
            SR=sr,
        )
        if gradient_clipping > 0:
            launcher.reduce_then_apply(_grok_partial, _grok_apply, lists, scalars, k=1, **cx)
        else:
            launcher.elementwise(_grok_apply, lists, (table, table, *scalars), K=1, **cx)
