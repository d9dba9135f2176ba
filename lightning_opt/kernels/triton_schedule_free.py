"""The schedule-free step's Triton kernel (AdamW, SGD, and the EMA-only direction RAdam's SGD phase uses).

Equal to ``lightning_opt.optim.schedule_free.schedule_free_step_`` per tensor: for ``"adam"``,
:func:`~lightning_opt.optim.schedule_free.adam_direction` then
:func:`~lightning_opt.optim.schedule_free.schedule_free_update_`, as ``AdamWScheduleFree.step`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import triton
import triton.language as tl
from torch import Tensor

from lightning_opt.kernels import triton_launcher as launcher
from lightning_opt.kernels.triton_adamw import lerp_coefficient
from lightning_opt.kernels.triton_common import address, block_of, div, hp, load, sqrt, store, store_param

__all__ = ["schedule_free_triton_"]

_DIRECTIONS = {"sgd": 0, "adam": 1, "ema": 2}


@triton.jit
def _schedule_free_kernel(
    PTRS,
    SIZES,
    BLOCKS,
    SEEDS,
    y_coeff: tl.float64,
    lr: tl.float64,
    beta2: tl.float64,
    one_minus_beta2: tl.float64,
    eps: tl.float64,
    bias_correction2: tl.float64,
    weight_decay: tl.float64,
    lerp_c: tl.float64,
    lerp_from_end: tl.float64,
    L: tl.constexpr,
    BLOCK: tl.constexpr,
    PK: tl.constexpr,
    GK: tl.constexpr,
    SK: tl.constexpr,
    DIRECTION: tl.constexpr,
    WD: tl.constexpr,
    SR: tl.constexpr,
):
    t, offs, mask = block_of(SIZES, BLOCKS, BLOCK)
    P = address(PTRS, t, 0, L)
    Z = address(PTRS, t, 2, L)
    # the math runs in z's dtype (float32 for bf16/fp16 parameters)
    y = load(P, offs, mask, PK)
    g = load(address(PTRS, t, 1, L), offs, mask, GK)
    z = load(Z, offs, mask, SK)
    if DIRECTION != 0:
        V = address(PTRS, t, 3, L)
        v = load(V, offs, mask, SK)
        v = tl.fma(hp(one_minus_beta2, SK) * g, g, v * hp(beta2, SK))  # mul_(beta2).addcmul_(g, g, 1 - beta2)
        store(V, offs, v, mask, SK)
        if DIRECTION == 1:
            d = div(g, sqrt(div(v, hp(bias_correction2, SK), SK), SK) + hp(eps, SK), SK)
        else:
            d = g
    else:
        d = g
    if WD:
        d = tl.fma(y, hp(weight_decay, SK), d)  # d.add_(y, alpha=weight_decay)
    w = hp(lerp_c, SK)
    y = tl.fma(w, z - y, tl.where(lerp_from_end != 0, z, y))  # y.lerp_(z, c)
    y = tl.fma(d, hp(y_coeff, SK), y)  # y.add_(d, alpha=lr (beta (1 - c) - 1))
    store(Z, offs, tl.fma(d, -hp(lr, SK), z), mask, SK)  # z.sub_(d, alpha=lr)
    store_param(P, offs, y, mask, PK, SR, SEEDS, t)


def schedule_free_triton_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    zs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor | None],
    *,
    direction: str,
    lr: float,
    beta: float,
    beta2: float,
    eps: float,
    bias_correction2: float,
    weight_decay: float,
    c: float,
    stochastic: bool = False,
    seed: int = 0,
) -> None:
    """One schedule-free step over one bucket in one Triton launch; equals ``schedule_free_step_`` per tensor.

    ``params`` hold ``y`` (train mode); ``zs`` and ``exp_avg_sqs`` are float32 for bf16/fp16
    parameters (``exp_avg_sqs`` may be ``None`` entries for ``direction="sgd"``); ``direction`` is
    ``"adam"`` (AdamWScheduleFree), ``"sgd"`` or ``"ema"`` (the squared-gradient EMA accumulates,
    the direction is the gradient); ``c`` is the averaging coefficient of
    ``schedule_free.average_weight``; ``stochastic`` rounds a bf16 ``y`` stochastically with bits of ``seed`` (the
    group's step count, the same for every tensor).
    """
    if not params:
        return
    if direction not in _DIRECTIONS:
        raise ValueError(
            f"schedule_free_triton_(direction={direction!r}) is invalid; expected one of {tuple(_DIRECTIONS)}"
        )
    pk = launcher.kind(params[0].dtype)
    sk = launcher.kind(zs[0].dtype)
    grads = launcher.same_dtype(grads, grads[0].dtype)
    vs = list(exp_avg_sqs) if direction != "sgd" else [None] * len(params)
    sr = bool(stochastic) and pk == 2
    launcher.elementwise(
        _schedule_free_kernel,
        [params, grads, zs, vs],
        (
            launcher.seed_table(sr, [seed] * len(params), len(params), params[0].device),
            lr * (beta * (1.0 - c) - 1.0),
            lr,
            beta2,
            1.0 - beta2,
            eps,
            bias_correction2,
            weight_decay,
            *lerp_coefficient(c, zs[0].dtype),
        ),
        PK=pk,
        GK=launcher.kind(grads[0].dtype),
        SK=sk,
        DIRECTION=_DIRECTIONS[direction],
        WD=weight_decay != 0,
        SR=sr,
    )
