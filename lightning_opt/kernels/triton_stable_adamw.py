"""StableAdamW's Triton kernels: equal to :func:`lightning_opt.optim.stable_adamw.stable_adamw_update_`.

Three launches per bucket (and distinct step): per-block partial sums of ``g^2 / max(v, eps^2)``,
their per-tensor sums in block order (deterministic), then the update with each tensor's clipped
``lr_t = lr / max(1, RMS)``, which is also written to a device tensor (no host sync).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_opt.kernels import triton_launcher as launcher
from lightning_opt.kernels.triton_common import (
    address,
    block_of,
    device,
    div,
    first_block,
    hp,
    load,
    round_to,
    sqrt,
    store,
    update,
)

__all__ = ["stable_adamw_triton_"]


@device
def _moments(
    PTRS, t, offs, mask, beta1, om_beta1, beta2, om_beta2,
    L: tl.constexpr, PK: tl.constexpr, GK: tl.constexpr, SK: tl.constexpr,
):
    g = load(address(PTRS, t, 1, L), offs, mask, GK)
    m = load(address(PTRS, t, 2, L), offs, mask, SK)
    v = load(address(PTRS, t, 3, L), offs, mask, SK)
    m = tl.fma(g, hp(om_beta1, PK), m * hp(beta1, PK))  # m.mul_(b1).add_(g, alpha=1 - b1)
    v = tl.fma(hp(om_beta2, PK) * g, g, v * hp(beta2, PK))  # v.mul_(b2).addcmul_(g, g, value=1 - b2)
    return g, m, v


@triton.jit
def _stable_partial(
    PTRS, SIZES, BLOCKS, PART, SEEDS,
    beta1: tl.float64, om_beta1: tl.float64, beta2: tl.float64, om_beta2: tl.float64,
    eps: tl.float64, eps_sq: tl.float64, lr: tl.float64, weight_decay: tl.float64, max_lr_: tl.float64,
    K: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr, PK: tl.constexpr, GK: tl.constexpr, SK: tl.constexpr,
    WD: tl.constexpr, DECOUPLE: tl.constexpr, KAHAN: tl.constexpr, SR: tl.constexpr,
):
    t, offs, mask = block_of(SIZES, BLOCKS, BLOCK)
    g, m, v = _moments(PTRS, t, offs, mask, beta1, om_beta1, beta2, om_beta2, L, PK, GK, SK)
    q = div(g * g, tl.maximum(v, hp(eps_sq, PK)), PK)
    # accumulated in float64 (torch's float32 mean is within its rounding of this)
    q = tl.where(mask, q, 0.0).to(tl.float64)
    tl.store(PART + tl.program_id(0) * K, tl.sum(q, axis=0))


@triton.jit
def _stable_apply(
    PTRS, SIZES, BLOCKS, SUMS, OUT, SEEDS,
    beta1: tl.float64, om_beta1: tl.float64, beta2: tl.float64, om_beta2: tl.float64,
    eps: tl.float64, eps_sq: tl.float64, lr: tl.float64, weight_decay: tl.float64, max_lr_: tl.float64,
    K: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr, PK: tl.constexpr, GK: tl.constexpr, SK: tl.constexpr,
    WD: tl.constexpr, DECOUPLE: tl.constexpr, KAHAN: tl.constexpr, SR: tl.constexpr,
):
    t, offs, mask = block_of(SIZES, BLOCKS, BLOCK)
    g, m, v = _moments(PTRS, t, offs, mask, beta1, om_beta1, beta2, om_beta2, L, PK, GK, SK)
    store(address(PTRS, t, 2, L), offs, m, mask, SK)
    store(address(PTRS, t, 3, L), offs, v, mask, SK)
    numel = tl.load(SIZES + t)
    mean = hp(tl.load(SUMS + t * K) / numel.to(tl.float64), PK)
    rms = sqrt(mean, PK)
    lr_t = div(hp(lr, PK), tl.maximum(rms, 1.0), PK)
    tl.store(OUT + t, lr_t, mask=first_block(BLOCKS))
    P = address(PTRS, t, 0, L)
    p = load(P, offs, mask, PK)
    if WD:
        if DECOUPLE:
            scale = div(lr_t, hp(max_lr_, PK), PK)
        else:
            scale = lr_t
        p = round_to(p * (1.0 - scale * hp(weight_decay, PK)), PK)  # param.mul_(1 - scale wd)
    delta = div(m, sqrt(v, PK) + hp(eps, PK), PK) * (-lr_t)
    update(P, address(PTRS, t, 4, L), offs, mask, p, delta, PK, KAHAN, SR, SEEDS, t)


def stable_adamw_triton_(
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
    decouple_lr: bool = False,
    max_lr: float | None = None,
    stochastic: bool = False,
) -> list[Tensor]:
    """StableAdamW over one bucket; equals ``stable_adamw_update_`` per tensor and returns its ``lr_t``.

    ``steps`` are the 1-based steps per tensor (three launches per distinct step: three in the usual
    case); ``kahan_comps`` all buffers or all ``None``; ``stochastic`` rounds bf16 parameters
    stochastically (``precision.apply_update_``, seeded by its step). Returns one 0-d tensor per parameter (the clipped
    lr, in the compute dtype, on the parameters' device), as the reference does.
    """
    if not params:
        return []
    from lightning_opt.optim.stable_adamw import debias_beta

    if decouple_lr and max_lr is None:
        raise ValueError("stable_adamw_triton_(decouple_lr=True) needs max_lr")
    pk = launcher.kind(params[0].dtype)
    compute = torch.float64 if pk == 1 else torch.float32
    grads = launcher.same_dtype(grads, grads[0].dtype)
    comps = list(kahan_comps) if kahan_comps else [None] * len(params)
    out: list[Tensor | None] = [None] * len(params)
    sr = bool(stochastic) and pk == 2
    for step, idx in launcher.by_value(list(steps)):
        b1, b2 = debias_beta(beta1, step), debias_beta(beta2, step)
        seeds = launcher.seed_table(sr, [step] * len(idx), len(idx), params[0].device)
        lists = [launcher.pick(x, idx) for x in (params, grads, exp_avgs, exp_avg_sqs, comps)]
        lr_t = launcher.reduce_then_apply(
            _stable_partial,
            _stable_apply,
            lists,
            (seeds, b1, 1 - b1, b2, 1 - b2, eps, eps * eps, lr, weight_decay, max_lr if decouple_lr else 1.0),
            k=1,
            out_dtype=compute,
            PK=pk,
            GK=launcher.kind(grads[0].dtype),
            SK=launcher.kind(exp_avgs[0].dtype),
            WD=weight_decay != 0,
            DECOUPLE=bool(decouple_lr),
            KAHAN=comps[0] is not None,
            SR=sr,
        )
        for j, i in enumerate(idx):
            out[i] = lr_t[j]
    return out  # type: ignore[return-value]
