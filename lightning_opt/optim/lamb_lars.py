"""Layer-wise adaptive large-batch optimizers: LAMB (You et al. 2019) and LARS (You et al. 2017).

Both scale each tensor's step by a trust ratio of norms (``||p|| / ||update||``), so they are
per-tensor, not elementwise: on a sharded tensor the norms must be all-reduced first.

Registered as ``lamb`` (DeepSpeed's ``Lamb`` resolves to it) and ``lars``.

Which tensors are adapted follows NVIDIA apex ``FusedLAMB`` and timm (NVLAMB): the trust ratio is
applied in param groups whose ``weight_decay`` is non-zero, or everywhere with ``always_adapt=True``.
``build_optimizer`` puts biases and norm gains in a ``weight_decay=0`` group, so with a non-zero
weight decay they get plain Adam (LAMB) / SGD (LARS) steps, as the papers' experiments do. With
``weight_decay=0`` and ``always_adapt=False`` nothing is adapted, so the classes warn when built that
way: pass ``always_adapt=True`` to get the paper's rule of adapting every tensor.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_opt.optim.base import (
    OptionCheck,
    backfill_group_defaults,
    check_betas,
    check_flag,
    check_lr_wd,
    check_param_group,
    check_rounding,
    ensure_kahan_comp,
    init_state,
    number_in,
    params_with_grad,
    run_closure,
)
from lightning_opt.optim.engine import Impl, check_impl, dispatch
from lightning_opt.optim.layout import guard_param_layout
from lightning_opt.optim.precision import (
    LOW_PRECISION,
    apply_update_,
    apply_updates_,
    compute_dtype,
    count_sr_step,
    exact_sqrt,
    sr_keys,
    tensor_norm,
    tensor_norms,
    total_norm,
)
from lightning_opt.optim.registry import OptimInfo, register

__all__ = [
    "LAMB_IMPLS",
    "LARS_IMPLS",
    "Lamb",
    "Lars",
    "lamb",
    "lamb_update_",
    "lars",
    "lars_update_",
    "trust_ratio",
]


def _check_number(cls: str, key: str, value: Any, ok: Callable[[float], bool], want: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{cls}({key}={value!r}) is invalid; it must be {want}")


def _warn_if_nothing_adapted(opt: Optimizer, cls: str) -> None:
    if not any(g["weight_decay"] != 0 or g["always_adapt"] for g in opt.param_groups):
        warnings.warn(
            f"{cls}: no param group has weight_decay != 0 and always_adapt=False, so no tensor gets a "
            f"trust ratio and this runs as plain {'Adam' if cls == 'Lamb' else 'SGD'}; pass always_adapt=True "
            "(the paper's rule) or a non-zero weight_decay",
            UserWarning,
            stacklevel=3,
        )


def trust_ratio(numerator: Tensor, denominator: Tensor, param_norm: Tensor, other_norm: Tensor) -> Tensor:
    """``numerator / denominator``, or 1 where either norm is 0 (a fresh zero bias, a zero update)."""
    ok = (param_norm > 0) & (other_norm > 0)
    return torch.where(
        ok, numerator / torch.where(ok, denominator, torch.ones_like(denominator)), torch.ones_like(numerator)
    )


def lamb_update_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
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
    kahan_comp: Tensor | None = None,
    stochastic: bool = False,
) -> None:
    """One LAMB (NVLAMB) step for one tensor (the reference of every impl).

    ``g = grad * grad_scale`` (the global-norm clip factor); ``m <- b1 m + (1-b1) g`` (``+ g`` without
    ``grad_averaging``); ``v <- b2 v + (1-b2) g^2``; ``u = (m/bc1) / (sqrt(v)/sqrt(bc2) + eps) + wd p``,
    computed as ``(m k) / (sqrt(v) + eps_q)`` (:func:`lamb_scalars`: one division, as torch's AdamW);
    with ``adapt``: ``u *= ||p|| / ||u||`` (1 if a norm is 0; at most 1 with ``trust_clip``);
    ``p -= lr u``. With ``kahan_comp`` the store is Kahan-compensated, with ``stochastic`` a bf16
    parameter is stochastically rounded with bits seeded by ``step`` (see ``precision``).
    """
    dt = compute_dtype(param)
    g = grad.to(dt) * grad_scale
    m, v = exp_avg.to(dt), exp_avg_sq.to(dt)
    m.mul_(beta1).add_(g, alpha=(1 - beta1) if grad_averaging else 1.0)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    k, eps_q = lamb_scalars(step, beta1, beta2, eps, bias_correction)
    u = (m * k).div_(exact_sqrt(v).add_(eps_q))
    p32 = param.to(dt)
    if weight_decay != 0:
        u.add_(p32, alpha=weight_decay)
    if adapt:
        w_norm, u_norm = tensor_norm(p32), tensor_norm(u)
        ratio = trust_ratio(w_norm, u_norm, w_norm, u_norm)
        if trust_clip:
            ratio = ratio.clamp(max=1.0)
        u.mul_(ratio)
    if m is not exp_avg:
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
    apply_update_(param, u.mul_(-lr), kahan_comp, stochastic=stochastic, seed=step)


def lars_update_(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
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
    kahan_comp: Tensor | None = None,
    stochastic: bool = False,
    seed: int = 0,
) -> Tensor | None:
    """One LARS step for one tensor (the reference); returns the momentum buffer (created on the first step).

    With ``adapt``: ``r = trust_coeff ||p|| / (||g|| + wd ||p|| + eps)`` (1 if a norm is 0;
    ``min(r / lr, 1)`` with ``trust_clip``, LARC) and ``d = (g + wd p) r``; else ``d = g + wd p``.
    Then SGD momentum as torch: ``buf = d`` on the first step, later ``buf <- mu buf + (1-damp) d``;
    ``d = d + mu buf`` (Nesterov) or ``buf``; ``p -= lr d``. ``kahan_comp``/``stochastic`` select the
    rounding of a bf16/fp16 store (see ``precision``; the stochastic bits are seeded by ``seed``, the
    tensor's step count).
    """
    dt = compute_dtype(param)
    p32 = param.to(dt)
    d = grad.to(dt, copy=True)
    if adapt:
        w_norm, g_norm = tensor_norm(p32), tensor_norm(d)
        ratio = trust_ratio(trust_coeff * w_norm, g_norm + weight_decay * w_norm + eps, w_norm, g_norm)
        if trust_clip:
            ratio = (ratio / lr).clamp(max=1.0) if lr > 0 else torch.ones_like(ratio)
    if weight_decay != 0:
        d.add_(p32, alpha=weight_decay)
    if adapt:
        d.mul_(ratio)
    if momentum != 0:
        if momentum_buffer is None:
            momentum_buffer = d.to(param.dtype, copy=True)
            buf = d.clone()
        else:
            buf = momentum_buffer.to(dt)
            buf.mul_(momentum).add_(d, alpha=1 - dampening)
            if buf is not momentum_buffer:
                momentum_buffer.copy_(buf)
        d = d.add_(buf, alpha=momentum) if nesterov else buf
    apply_update_(param, d.mul(-lr), kahan_comp, stochastic=stochastic, seed=seed)
    return momentum_buffer


# --------------------------------------------------------------------------------------------------
# list-level implementations (one signature each; the engine picks one per (device, dtype) bucket)


def _check_grad_dtypes(cls: str, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    # the fused kernel reads a gradient as the parameter's type
    for p, g in zip(params, grads):
        if g.dtype != p.dtype:
            raise TypeError(
                f"{cls}(impl='fused') needs gradients in the parameters' dtype, got a {g.dtype} gradient for a "
                f"{p.dtype} parameter; use impl='for_loop'"
            )


def _on(scale: Tensor | float, device: torch.device) -> Tensor | float:
    return scale.to(device) if isinstance(scale, Tensor) else scale


def lamb_scalars(step: int, beta1: float, beta2: float, eps: float, bias_correction: bool) -> tuple[float, float]:
    """``k = sqrt(bc2) / bc1`` and ``eps_q = eps sqrt(bc2)`` of a tensor at ``step`` (Python floats).

    LAMB's direction ``(m / bc1) / (sqrt(v) / sqrt(bc2) + eps)`` equals ``(m k) / (sqrt(v) + eps_q)``;
    every impl takes it in that form (one rounding of each scalar, one division per element), so
    they agree to the last bit.
    """
    if not bias_correction:
        return 1.0, eps
    sbc2 = math.sqrt(1 - beta2**step)
    return sbc2 / (1 - beta1**step), eps * sbc2


def _lamb_corrections(steps: Sequence[int], beta1: float, beta2: float, eps: float, bias_correction: bool) -> tuple[list, list]:
    """:func:`lamb_scalars` of each tensor: the lists of ``k`` and ``eps_q``."""
    pairs = [lamb_scalars(s, beta1, beta2, eps, bias_correction) for s in steps]
    return [k for k, _ in pairs], [e for _, e in pairs]


def _lamb_for_loop(params, grads, exp_avgs, exp_avg_sqs, kahan_comps, steps, *, grad_scale=1.0, **hp: Any) -> None:
    for p, g, m, v, c, s in zip(params, grads, exp_avgs, exp_avg_sqs, kahan_comps, steps):
        lamb_update_(p, g, m, v, step=s, grad_scale=_on(grad_scale, p.device), kahan_comp=c, **hp)


def _lamb_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    kahan_comps: list[Tensor | None],
    steps: list[int],
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
    dt = compute_dtype(params[0])
    low = params[0].dtype in LOW_PRECISION
    g = torch._foreach_mul([x.to(dt) for x in grads], _on(grad_scale, params[0].device))
    m = [x.to(dt) for x in exp_avgs]
    v = [x.to(dt) for x in exp_avg_sqs]
    torch._foreach_mul_(m, beta1)
    torch._foreach_add_(m, g, alpha=(1 - beta1) if grad_averaging else 1.0)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, g, g, value=1 - beta2)
    k, eps_q = _lamb_corrections(steps, beta1, beta2, eps, bias_correction)
    u = torch._foreach_mul(m, k)
    denom = [exact_sqrt(x) for x in v]
    torch._foreach_add_(denom, eps_q)
    torch._foreach_div_(u, denom)
    p32 = [x.to(dt) for x in params]
    if weight_decay != 0:
        torch._foreach_add_(u, p32, alpha=weight_decay)
    if adapt:
        # one reduction (on shards one all-reduce) for both norms of every tensor
        w_norm, u_norm = tensor_norms([*p32, *u]).split(len(p32))
        ratio = trust_ratio(w_norm, u_norm, w_norm, u_norm)
        if trust_clip:
            ratio = ratio.clamp(max=1.0)
        torch._foreach_mul_(u, list(ratio.unbind(0)))
    if low:
        torch._foreach_copy_(exp_avgs, m)
        torch._foreach_copy_(exp_avg_sqs, v)
    torch._foreach_mul_(u, -lr)
    apply_updates_(params, u, kahan_comps, stochastic=stochastic, seeds=steps)


def _lamb_fused(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    kahan_comps,
    steps,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    grad_scale=1.0,
    bias_correction=True,
    grad_averaging=True,
    adapt=True,
    trust_clip=False,
    stochastic=False,
) -> None:
    from lightning_opt.kernels import cpu

    _check_grad_dtypes("Lamb", params, grads)
    k, eps_q = _lamb_corrections(steps, beta1, beta2, eps, bias_correction)
    per = [x for pair in zip(k, eps_q) for x in pair]
    # the clip factor is a CPU tensor here: reading it is no device sync
    hp = [lr, beta1, beta2, eps, weight_decay, float(grad_scale), (1 - beta1) if grad_averaging else 1.0, *per]
    cpu.launch(
        "lamb_lars",
        "lamb",
        [params, grads, exp_avgs, exp_avg_sqs, kahan_comps],
        hp,
        [int(adapt), int(trust_clip), int(stochastic), *sr_keys(stochastic, steps, len(params))],
        state_dtype=exp_avgs[0].dtype,
    )


def _lamb_triton(*args: Any, **hp: Any) -> None:
    from lightning_opt.kernels.triton_lamb_lars import lamb_triton_

    lamb_triton_(*args, **hp)


#: LAMB's implementations, by ``impl`` name (``for_loop`` is the reference)
LAMB_IMPLS: dict[str, Callable[..., Any]] = {
    "for_loop": _lamb_for_loop,
    "foreach": _lamb_foreach,
    "fused": _lamb_fused,
    "triton": _lamb_triton,
}


def lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    kahan_comps: list[Tensor | None],
    steps: list[int],
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
    impl: str = "auto",
) -> None:
    """LAMB over tensor lists (the functional API): :func:`lamb_update_` for every tensor, by ``impl``.

    ``steps`` holds each tensor's 1-based step count; ``grad_scale`` is the global clip factor (a
    0-dim tensor, so computing it needs no host sync, or ``1.0``).
    """
    dispatch(
        "Lamb",
        "lamb_lars",
        impl,
        LAMB_IMPLS,
        reduces=True,
        lists={
            "params": params,
            "grads": grads,
            "exp_avgs": exp_avgs,
            "exp_avg_sqs": exp_avg_sqs,
            "kahan_comps": kahan_comps,
            "steps": steps,
        },
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        grad_scale=grad_scale,
        bias_correction=bias_correction,
        grad_averaging=grad_averaging,
        adapt=adapt,
        trust_clip=trust_clip,
        stochastic=stochastic,
    )


def _lars_for_loop(params, grads, momentum_buffers, kahan_comps, steps, **hp: Any) -> list[Tensor | None]:
    lists = (params, grads, momentum_buffers, kahan_comps, steps)
    return [lars_update_(p, g, b, kahan_comp=c, seed=s, **hp) for p, g, b, c, s in zip(*lists)]


def _lars_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    kahan_comps: list[Tensor | None],
    steps: list[int],
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
) -> list[Tensor | None]:
    dt = compute_dtype(params[0])
    p32 = [x.to(dt) for x in params]
    d = [x.to(dt, copy=True) for x in grads]
    if adapt:
        w_norm, g_norm = tensor_norms([*p32, *d]).split(len(p32))
        ratio = trust_ratio(trust_coeff * w_norm, g_norm + weight_decay * w_norm + eps, w_norm, g_norm)
        if trust_clip:
            ratio = (ratio / lr).clamp(max=1.0) if lr > 0 else torch.ones_like(ratio)
    if weight_decay != 0:
        torch._foreach_add_(d, p32, alpha=weight_decay)
    if adapt:
        torch._foreach_mul_(d, list(ratio.unbind(0)))
    buffers = list(momentum_buffers)
    if momentum != 0:
        old = [i for i, b in enumerate(buffers) if b is not None]
        bufs: list[Tensor] = [None] * len(d)  # type: ignore[list-item]
        for i, b in enumerate(buffers):
            if b is None:  # torch SGD's first step: buf = d
                buffers[i] = d[i].to(params[i].dtype, copy=True)
                bufs[i] = d[i].clone()
        if old:
            b32 = [buffers[i].to(dt) for i in old]
            torch._foreach_mul_(b32, momentum)
            torch._foreach_add_(b32, [d[i] for i in old], alpha=1 - dampening)
            if params[0].dtype != dt:
                torch._foreach_copy_([buffers[i] for i in old], b32)
            for i, b in zip(old, b32):
                bufs[i] = b
        if nesterov:
            torch._foreach_add_(d, bufs, alpha=momentum)
        else:
            d = bufs
    apply_updates_(params, torch._foreach_mul(d, -lr), kahan_comps, stochastic=stochastic, seeds=steps)
    return buffers


def _lars_fused(
    params,
    grads,
    momentum_buffers,
    kahan_comps,
    steps,
    *,
    lr,
    momentum,
    dampening,
    nesterov,
    weight_decay,
    trust_coeff,
    eps,
    adapt=True,
    trust_clip=False,
    stochastic=False,
) -> list[Tensor | None]:
    from lightning_opt.kernels import cpu

    _check_grad_dtypes("Lars", params, grads)
    buffers = list(momentum_buffers)
    fresh = [0] * len(params)
    if momentum != 0:
        for i, b in enumerate(buffers):
            if b is None:  # the kernel writes buf = d into it
                buffers[i] = torch.empty_like(params[i], memory_format=torch.contiguous_format)
                fresh[i] = 1
    cpu.launch(
        "lamb_lars",
        "lars",
        [params, grads, buffers, kahan_comps],
        [lr, momentum, dampening, weight_decay, trust_coeff, eps],
        # the switches, each tensor's fresh-buffer flag, then (with stochastic) its seed key (csrc/lamb_lars.c)
        [int(adapt), int(trust_clip), int(nesterov), int(stochastic), *fresh, *sr_keys(stochastic, steps, len(params))],
    )
    return buffers


def _lars_triton(*args: Any, **hp: Any) -> list[Tensor | None]:
    from lightning_opt.kernels.triton_lamb_lars import lars_triton_

    return lars_triton_(*args, **hp)


#: LARS's implementations, by ``impl`` name (``for_loop`` is the reference)
LARS_IMPLS: dict[str, Callable[..., Any]] = {
    "for_loop": _lars_for_loop,
    "foreach": _lars_foreach,
    "fused": _lars_fused,
    "triton": _lars_triton,
}


def lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    kahan_comps: list[Tensor | None],
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
    steps: list[int] | None = None,
    impl: str = "auto",
) -> list[Tensor | None]:
    """LARS over tensor lists (the functional API): :func:`lars_update_` for every tensor, by ``impl``.

    Returns the momentum buffers (new ones where ``momentum_buffers`` had ``None``), or ``[]``.
    ``steps``: each tensor's step count, the seed of its stochastic rounding (``None``: 0 for all).
    """
    return dispatch(
        "Lars",
        "lamb_lars",
        impl,
        LARS_IMPLS,
        reduces=True,
        lists={
            "params": params,
            "grads": grads,
            "momentum_buffers": momentum_buffers,
            "kahan_comps": kahan_comps,
            "steps": [0] * len(params) if steps is None else steps,
        },
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=weight_decay,
        trust_coeff=trust_coeff,
        eps=eps,
        adapt=adapt,
        trust_clip=trust_clip,
        stochastic=stochastic,
    )


# --------------------------------------------------------------------------------------------------
# the optimizers


class Lamb(Optimizer):
    """LAMB: Adam directions scaled per tensor to ``lr * ||p||`` (NVLAMB semantics, as apex and timm).

    Args:
        params: parameters or param-group dicts.
        lr: learning rate (default ``1e-3``).
        betas: moment decay rates (default ``(0.9, 0.999)``).
        eps: added to the bias-corrected ``sqrt(v)`` (default ``1e-6``).
        weight_decay: added to the update as ``wd * p`` before the trust ratio (default ``1e-2``);
            a group with ``weight_decay != 0`` is trust-ratio adapted.
        bias_correction: bias-correct the moments (default ``True``; ``False`` is the paper's v3).
        grad_averaging: weight the new gradient by ``1 - beta1`` in ``m`` (default ``True``).
        max_grad_norm: clip the *global* gradient norm (over all groups) to this before the moments,
            without touching ``p.grad``; ``0`` disables it (default ``1.0``). Do not also clip in the
            Trainer.
        trust_clip: clamp the trust ratio at 1 (LAMBC) (default ``False``).
        always_adapt: adapt groups with ``weight_decay == 0`` too (the paper) (default ``False``).
        kahan_sum: Kahan-compensate bf16/fp16 parameter updates (default ``False``).
        stochastic_rounding: round the updated bf16 parameters stochastically instead (default
            ``False``; no extra memory; exclusive with ``kahan_sum``).
        impl: ``"auto"`` (default: the fused CPU kernel on the CPU, Triton on CUDA), ``"for_loop"``,
            ``"foreach"``, ``"fused"`` or ``"triton"`` (see :mod:`lightning_opt.optim.engine`).

    Raises:
        ValueError: invalid lr, weight_decay, eps, betas or max_grad_norm; a flag that is not a bool;
            both roundings; an unknown ``impl``.

    Example:
        >>> opt = Lamb(model.parameters(), lr=2e-3, weight_decay=0.01)

    Differences from ``pytorch_optimizer.Lamb``: that one adapts every tensor, clamps ``||p||`` at
    10, adds ``eps`` to ``||u||``, keeps ``1/bc1`` outside the trust ratio and has no ``bc2``; it
    equals ours with ``bias_correction=False, always_adapt=True`` and its ``adam_debias=True,
    weight_decouple=False`` (tests/optim/test_lamb_lars.py). Paper: You et al., "Large Batch
    Optimization for Deep Learning: Training BERT in 76 minutes", arXiv:1904.00962.
    """

    #: the ``impl`` values this class takes besides ``"auto"`` (the contract suite runs each)
    impls: ClassVar[tuple[str, ...]] = tuple(LAMB_IMPLS)
    #: per-tensor statistics have no complex form here (base.reject_complex)
    supports_complex: ClassVar[bool] = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 1e-2,
        *,
        bias_correction: bool = True,
        grad_averaging: bool = True,
        max_grad_norm: float = 1.0,
        trust_clip: bool = False,
        always_adapt: bool = False,
        kahan_sum: bool = False,
        stochastic_rounding: bool = False,
        impl: Impl = "auto",
    ) -> None:
        check_lr_wd("Lamb", lr, weight_decay)
        betas = check_betas("Lamb", betas)
        _check_number("Lamb", "eps", eps, lambda x: x >= 0, "a finite number >= 0")
        _check_number(
            "Lamb", "max_grad_norm", max_grad_norm, lambda x: x >= 0, "a finite number >= 0 (0 disables clipping)"
        )
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "bias_correction": check_flag("Lamb", "bias_correction", bias_correction),
            "grad_averaging": check_flag("Lamb", "grad_averaging", grad_averaging),
            "trust_clip": check_flag("Lamb", "trust_clip", trust_clip),
            "always_adapt": check_flag("Lamb", "always_adapt", always_adapt),
            **check_rounding("Lamb", kahan_sum, stochastic_rounding),
            "impl": check_impl("Lamb", impl, tuple(LAMB_IMPLS)),
        }
        # the clip is global over every group, so it is one number for the optimizer
        self.max_grad_norm = float(max_grad_norm)
        super().__init__(params, defaults)
        guard_param_layout(self, type(self).__name__, "takes per-tensor norms of each whole parameter (trust ratios)")
        _warn_if_nothing_adapted(self, "Lamb")

    def __getstate__(self) -> dict[str, Any]:
        # torch pickles only defaults/state/param_groups; the global clip is not in a group
        return {**super().__getstate__(), "max_grad_norm": self.max_grad_norm}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("max_grad_norm", 1.0)
        backfill_group_defaults(self, kahan_sum=False, stochastic_rounding=False, impl="auto")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # a group's own options are checked as the constructor's, before it is added
        super().add_param_group(check_param_group(self, param_group))

    @torch.no_grad()
    def _grad_scale(self) -> Tensor | float:
        if self.max_grad_norm <= 0:
            return 1.0
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return 1.0
        total = total_norm("Lamb", grads)  # on FSDP2 shards one all-reduce
        return 1.0 / (total / self.max_grad_norm).clamp(min=1.0)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; ``closure`` is called once, with grad enabled."""
        loss = run_closure(closure)
        scale = self._grad_scale()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            params, grads, exp_avgs, exp_avg_sqs, comps, steps = [], [], [], [], [], []
            for p in params_with_grad(group, "Lamb"):
                state = self.state[p]
                init_state(state, p, "exp_avg", "exp_avg_sq", kahan_sum=group["kahan_sum"])
                state["step"] += 1
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                comps.append(state.get("kahan_comp") if group["kahan_sum"] else None)
                steps.append(state["step"])
            lamb(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                comps,
                steps,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                grad_scale=scale,
                bias_correction=group["bias_correction"],
                grad_averaging=group["grad_averaging"],
                adapt=group["weight_decay"] != 0 or group["always_adapt"],
                trust_clip=group["trust_clip"],
                stochastic=group["stochastic_rounding"],
                impl=group["impl"],
            )
        return loss


class Lars(Optimizer):
    """LARS: SGD with momentum whose per-tensor lr is ``trust_coeff * ||p|| / (||g|| + wd ||p||)``.

    Follows timm's ``Lars`` (apex LARC with ``trust_clip``); the momentum is torch SGD's.

    Args:
        params: parameters or param-group dicts.
        lr: global learning rate (default ``1.0``; the trust ratio makes steps ``~lr * trust_coeff``
            relative to ``||p||``).
        momentum: momentum factor (default ``0.9``, the paper's).
        dampening: momentum dampening (default ``0.0``).
        weight_decay: L2 decay ``wd * p`` added to the gradient (default ``0.0``); a group with
            ``weight_decay != 0`` is trust-ratio adapted.
        nesterov: Nesterov momentum (default ``False``).
        trust_coeff: the trust coefficient eta (default ``1e-3``).
        eps: added to the trust-ratio denominator (default ``1e-8``).
        trust_clip: LARC: use ``min(trust / lr, 1)`` as the ratio (default ``False``).
        always_adapt: adapt groups with ``weight_decay == 0`` too (default ``False``).
        kahan_sum: Kahan-compensate bf16/fp16 parameter updates (default ``False``).
        stochastic_rounding: round the updated bf16 parameters stochastically instead (default
            ``False``; exclusive with ``kahan_sum``); each bf16 parameter then keeps an int ``step``
            in its state, the seed of its rounding (a checkpoint without it resumes at 0).
        impl: ``"auto"`` (default: the fused CPU kernel on the CPU, Triton on CUDA), ``"for_loop"``,
            ``"foreach"``, ``"fused"`` or ``"triton"`` (see :mod:`lightning_opt.optim.engine`).

    Raises:
        ValueError: invalid lr, weight_decay, momentum, dampening, trust_coeff or eps, or
            ``nesterov`` without momentum or with dampening; a flag that is not a bool; both
            roundings; an unknown ``impl``.

    Example:
        >>> opt = Lars(model.parameters(), lr=4.8, weight_decay=1e-6, momentum=0.9)

    Differences from ``pytorch_optimizer.Lars``: that one adapts (and decays) only tensors with
    ``ndim > 1`` whatever the group, has no ``eps`` and zero-initialises the momentum buffer (equal
    to torch's only with ``dampening=0``). Paper: You, Gitman & Ginsburg, "Large Batch Training of
    Convolutional Networks", arXiv:1708.03888.
    """

    #: the ``impl`` values this class takes besides ``"auto"`` (the contract suite runs each)
    impls: ClassVar[tuple[str, ...]] = tuple(LARS_IMPLS)
    #: per-tensor statistics have no complex form here (base.reject_complex)
    supports_complex: ClassVar[bool] = False
    #: group options with their own checks (base.check_options: the constructor's and each group's)
    option_checks: ClassVar[dict[str, OptionCheck]] = {
        "dampening": number_in(lambda x: 0 <= x <= 1, "it must be a number in [0, 1]"),
        "trust_coeff": number_in(lambda x: x > 0, "it must be a finite number > 0"),
    }

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        trust_coeff: float = 1e-3,
        eps: float = 1e-8,
        trust_clip: bool = False,
        always_adapt: bool = False,
        kahan_sum: bool = False,
        stochastic_rounding: bool = False,
        impl: Impl = "auto",
    ) -> None:
        check_lr_wd("Lars", lr, weight_decay)
        _check_number("Lars", "momentum", momentum, lambda x: 0 <= x < 1, "a number in [0, 1)")
        _check_number("Lars", "dampening", dampening, lambda x: 0 <= x <= 1, "a number in [0, 1]")
        _check_number("Lars", "trust_coeff", trust_coeff, lambda x: x > 0, "a finite number > 0")
        _check_number("Lars", "eps", eps, lambda x: x >= 0, "a finite number >= 0")
        nesterov = check_flag("Lars", "nesterov", nesterov)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(
                f"Lars(nesterov=True) needs momentum > 0 and dampening = 0 (got momentum={momentum}, dampening={dampening})"
            )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "trust_coeff": trust_coeff,
            "eps": eps,
            "trust_clip": check_flag("Lars", "trust_clip", trust_clip),
            "always_adapt": check_flag("Lars", "always_adapt", always_adapt),
            **check_rounding("Lars", kahan_sum, stochastic_rounding),
            "impl": check_impl("Lars", impl, tuple(LARS_IMPLS)),
        }
        super().__init__(params, defaults)
        guard_param_layout(self, type(self).__name__, "takes per-tensor norms of each whole parameter (trust ratios)")
        _warn_if_nothing_adapted(self, "Lars")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        backfill_group_defaults(self, kahan_sum=False, stochastic_rounding=False, impl="auto")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # a group's own options are checked as the constructor's, before it is added
        super().add_param_group(check_param_group(self, param_group))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; ``closure`` is called once, with grad enabled."""
        loss = run_closure(closure)
        for group in self.param_groups:
            params, grads, bufs, comps, steps = [], [], [], [], []
            for p in params_with_grad(group, "Lars"):
                state = self.state[p]
                ensure_kahan_comp(state, p, group["kahan_sum"])
                steps.append(count_sr_step(state, p, group["stochastic_rounding"]))
                params.append(p)
                grads.append(p.grad)
                bufs.append(state.get("momentum_buffer"))
                comps.append(state.get("kahan_comp") if group["kahan_sum"] else None)
            new_bufs = lars(
                params,
                grads,
                bufs,
                comps,
                lr=group["lr"],
                momentum=group["momentum"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                weight_decay=group["weight_decay"],
                trust_coeff=group["trust_coeff"],
                eps=group["eps"],
                adapt=group["weight_decay"] != 0 or group["always_adapt"],
                trust_clip=group["trust_clip"],
                stochastic=group["stochastic_rounding"],
                steps=steps,
                impl=group["impl"],
            )
            for p, buf in zip(params, new_bufs):
                if buf is not None:
                    self.state[p]["momentum_buffer"] = buf
        return loss


register(
    OptimInfo(
        name="lamb",
        cls=Lamb,
        description="LAMB (NVLAMB as apex/timm): per-tensor trust ratio on Adam, global grad clip",
        paper="You et al., arXiv:1904.00962",
        default_lr=1e-3,
    )
)
# DeepSpeed's "Lamb" is our name already (names match case-insensitively)
register(
    OptimInfo(
        name="lars",
        cls=Lars,
        description="LARS (as timm; LARC with trust_clip): per-tensor trust ratio on SGD momentum",
        paper="You, Gitman & Ginsburg, arXiv:1708.03888",
        default_lr=1.0,
    )
)
