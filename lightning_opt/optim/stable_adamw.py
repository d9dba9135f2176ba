"""StableAdamW: AdamW with per-tensor update clipping (Wortsman et al. 2023, arXiv:2304.13013).

Registered as ``stable_adamw`` (also Hugging Face's name for it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
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
    sr_keys,
    tensor_abs_mean,
    tensor_abs_means,
)
from lightning_opt.optim.registry import OptimInfo, register

__all__ = ["STABLE_ADAMW_IMPLS", "StableAdamW", "debias_beta", "stable_adamw", "stable_adamw_update_"]


def debias_beta(beta: float, step: int) -> float:
    """``beta (1 - beta^(t-1)) / (1 - beta^t)``: the EMA weight whose average is already unbiased."""
    return beta * (1 - beta ** (step - 1)) / (1 - beta**step)


def stable_adamw_update_(
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
    decouple_lr: bool = False,
    max_lr: float | None = None,
    kahan_comp: Tensor | None = None,
    stochastic: bool = False,
) -> Tensor:
    """One StableAdamW step for one tensor (``step`` is 1-based); returns the clipped lr (0-d tensor).

    ``m`` and ``v`` are EMAs with debiased betas (so they are the bias-corrected moments);
    ``RMS = sqrt(mean(g^2 / max(v, eps^2)))``; ``lr_t = lr / max(1, RMS)``; decay
    ``p *= 1 - lr_t wd`` (or ``1 - (lr_t / max_lr) wd`` with ``decouple_lr``); then
    ``p -= lr_t m / (sqrt(v) + eps)``. No host sync: ``lr_t`` stays a tensor. The math runs in
    float32 for bf16/fp16 tensors; with ``kahan_comp`` the update is Kahan-compensated, with
    ``stochastic`` a bf16 parameter is stochastically rounded with bits seeded by ``step`` (see
    ``precision``).
    """
    dt = compute_dtype(param)
    g = grad.to(dt)
    m = exp_avg.to(dt)
    v = exp_avg_sq.to(dt)
    b1, b2 = debias_beta(beta1, step), debias_beta(beta2, step)
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    rms = tensor_abs_mean((g * g).div_(v.clamp(min=eps * eps))).sqrt()
    lr_t = lr / rms.clamp(min=1.0)
    if weight_decay != 0:
        scale = lr_t / max_lr if decouple_lr else lr_t
        param.mul_(1 - scale * weight_decay)
    delta = (m / (v.sqrt().add_(eps))).mul_(-lr_t)
    if m is not exp_avg:
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
    apply_update_(param, delta, kahan_comp, stochastic=stochastic, seed=step)
    return lr_t


# --------------------------------------------------------------------------------------------------
# the implementations: one signature, per (device, dtype) bucket (lightning_opt.optim.engine)


def _stable_adamw_for_loop(params, grads, exp_avgs, exp_avg_sqs, kahan_comps, steps, **hp: Any) -> list[Tensor]:
    return [
        stable_adamw_update_(p, g, m, v, step=s, kahan_comp=c, **hp)
        for p, g, m, v, c, s in zip(params, grads, exp_avgs, exp_avg_sqs, kahan_comps, steps)
    ]


def _stable_adamw_foreach(
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
    decouple_lr: bool = False,
    max_lr: float | None = None,
    stochastic: bool = False,
) -> list[Tensor]:
    low = params[0].dtype in LOW_PRECISION
    g = [x.float() for x in grads] if low else list(grads)
    m = [x.float() for x in exp_avgs] if low else list(exp_avgs)
    v = [x.float() for x in exp_avg_sqs] if low else list(exp_avg_sqs)
    # the debiased betas depend on each tensor's own step: one foreach call per distinct step
    by_step: dict[int, list[int]] = {}
    for i, s in enumerate(steps):
        by_step.setdefault(s, []).append(i)
    for s, idx in by_step.items():
        b1, b2 = debias_beta(beta1, s), debias_beta(beta2, s)
        gs, ms, vs = [g[i] for i in idx], [m[i] for i in idx], [v[i] for i in idx]
        torch._foreach_mul_(ms, b1)
        torch._foreach_add_(ms, gs, alpha=1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)
    ratio = torch._foreach_mul(g, g)
    torch._foreach_div_(ratio, torch._foreach_clamp_min(v, eps * eps))
    # the per-tensor means of the non-negative ratios (on shards: one all-reduce for the list)
    lr_ts = list((lr / tensor_abs_means(ratio).sqrt_().clamp_(min=1.0)).unbind(0))
    if weight_decay != 0:
        scales = [t / max_lr for t in lr_ts] if decouple_lr else lr_ts
        torch._foreach_mul_(params, [1 - t * weight_decay for t in scales])
    denom = torch._foreach_sqrt(v)
    torch._foreach_add_(denom, eps)
    delta = torch._foreach_div(m, denom)
    torch._foreach_mul_(delta, [-t for t in lr_ts])
    if low:
        torch._foreach_copy_(exp_avgs, m)
        torch._foreach_copy_(exp_avg_sqs, v)
    apply_updates_(params, delta, kahan_comps, stochastic=stochastic, seeds=steps)
    return lr_ts


def _stable_adamw_fused(
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
    decouple_lr=False,
    max_lr=None,
    stochastic=False,
) -> list[float]:
    from lightning_opt.kernels import cpu

    hp = [lr, eps, weight_decay, max_lr if decouple_lr else 1.0]
    for s in steps:
        hp += [debias_beta(beta1, s), debias_beta(beta2, s)]
    out = cpu.launch(
        "stable_adamw",
        "stable_adamw",
        [params, grads, exp_avgs, exp_avg_sqs, kahan_comps],
        hp,
        # the switches, then (with stochastic rounding) each tensor's seed key (csrc/stable_adamw.c)
        [int(stochastic), int(decouple_lr), *sr_keys(stochastic, steps, len(params))],
        state_dtype=exp_avgs[0].dtype,
        n_out=1,
    )
    return [o[0] for o in out]


def _stable_adamw_triton(params, grads, exp_avgs, exp_avg_sqs, kahan_comps, steps, **hp: Any) -> list[Tensor]:
    from lightning_opt.kernels.triton_stable_adamw import stable_adamw_triton_

    return stable_adamw_triton_(params, grads, exp_avgs, exp_avg_sqs, kahan_comps, steps, **hp)


#: StableAdamW's implementations, by ``impl`` name (``for_loop`` is the reference)
STABLE_ADAMW_IMPLS = {
    "for_loop": _stable_adamw_for_loop,
    "foreach": _stable_adamw_foreach,
    "fused": _stable_adamw_fused,
    "triton": _stable_adamw_triton,
}


def stable_adamw(
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
    decouple_lr: bool = False,
    max_lr: float | None = None,
    stochastic: bool = False,
    impl: str = "auto",
) -> list[Tensor | float]:
    """StableAdamW over tensor lists (the functional API): :func:`stable_adamw_update_` for every tensor.

    ``steps`` holds each tensor's 1-based step (already incremented). Returns each tensor's clipped
    lr: a 0-d tensor (``for_loop``, ``foreach``, ``triton``: no host sync) or a float (``fused``,
    computed on the host anyway).

    Raises:
        ValueError: ``decouple_lr`` without ``max_lr``.
    """
    if decouple_lr and max_lr is None:
        raise ValueError("stable_adamw(decouple_lr=True) needs max_lr (the schedule's peak lr)")
    return dispatch(
        "StableAdamW",
        "stable_adamw",
        impl,
        STABLE_ADAMW_IMPLS,
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
        decouple_lr=decouple_lr,
        max_lr=max_lr,
        stochastic=stochastic,
    )


class StableAdamW(Optimizer):
    """AdamW whose step size is divided by ``max(1, RMS(g / sqrt(v)))`` per tensor (update clipping).

    It replaces global gradient clipping: a tensor whose gradient is large relative to its second
    moment (a loss spike) takes a proportionally smaller step.

    The RMS is per tensor, so on a sharded tensor (FSDP, ZeRO) it must be all-reduced first; this
    class computes it over the local tensor.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate (default ``1e-3``).
        betas: moment decay rates (default ``(0.9, 0.99)``, as the paper and torch-optimi).
        weight_decay: decoupled weight decay (default ``1e-2``). It scales with the *clipped* lr:
            ``p *= 1 - lr_t * weight_decay`` (the paper's Algorithm 2 and torch-optimi).
        eps: added to ``sqrt(v)``; ``eps**2`` floors ``v`` in the RMS (default ``1e-6``).
        decouple_lr: fully decoupled decay ``p *= 1 - (lr_t / max_lr) * weight_decay``, so the
            decay does not shrink with the lr schedule's peak (default ``False``).
        max_lr: the schedule's peak lr for ``decouple_lr`` (default: each group's initial ``lr``).
        kahan_sum: Kahan-compensate bf16/fp16 parameter updates (default ``False``; unlike
            torch-optimi it is never switched on automatically).
        stochastic_rounding: round the updated bf16 parameters stochastically instead (default
            ``False``; no extra memory; exclusive with ``kahan_sum``).
        impl: ``"auto"`` (default: the fused CPU kernel on the CPU, Triton on CUDA), ``"for_loop"``,
            ``"foreach"``, ``"fused"`` or ``"triton"`` (see :mod:`lightning_opt.optim.engine`). The
            fused and Triton kernels compute each tensor's RMS deterministically (the same partial
            sums added in the same order whatever the thread or block count).

    Raises:
        ValueError: invalid ``lr``, ``weight_decay``, ``eps``, betas or ``max_lr`` (also in
            ``add_param_group``); a flag not a bool; both roundings; an unknown ``impl``.

    Example:
        >>> opt = StableAdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

    Equal to ``optimi.StableAdamW`` with the same options. Paper: Wortsman et al., "Stable and
    low-precision training for large-scale vision-language models", arXiv:2304.13013.
    """

    #: the ``impl`` values this class takes besides ``"auto"`` (the contract suite runs each)
    impls: ClassVar[tuple[str, ...]] = tuple(STABLE_ADAMW_IMPLS)
    #: the per-tensor RMS clip has no complex form here (base.reject_complex)
    supports_complex: ClassVar[bool] = False
    #: group options with their own checks (base.check_options: the constructor's and each group's)
    option_checks: ClassVar[dict[str, OptionCheck]] = {
        "max_lr": number_in(lambda x: x > 0, "it must be a finite number > 0 (or None)", optional=True),
    }

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 1e-2,
        eps: float = 1e-6,
        *,
        decouple_lr: bool = False,
        max_lr: float | None = None,
        kahan_sum: bool = False,
        stochastic_rounding: bool = False,
        impl: Impl = "auto",
    ) -> None:
        check_lr_wd("StableAdamW", lr, weight_decay)
        betas = check_betas("StableAdamW", betas)
        if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"StableAdamW(eps={eps!r}) is invalid; it must be a finite number >= 0")
        if max_lr is not None and (not isinstance(max_lr, (int, float)) or not math.isfinite(max_lr) or max_lr <= 0):
            raise ValueError(f"StableAdamW(max_lr={max_lr!r}) is invalid; it must be a finite number > 0 (or None)")
        if max_lr is not None and not decouple_lr:
            raise ValueError(
                "StableAdamW(max_lr=...) only matters with decouple_lr=True; set decouple_lr=True or drop max_lr"
            )
        defaults = {
            "lr": lr,
            "betas": betas,
            "weight_decay": weight_decay,
            "eps": eps,
            "decouple_lr": check_flag("StableAdamW", "decouple_lr", decouple_lr),
            "max_lr": max_lr,
            **check_rounding("StableAdamW", kahan_sum, stochastic_rounding),
            "impl": check_impl("StableAdamW", impl, tuple(STABLE_ADAMW_IMPLS)),
        }
        super().__init__(params, defaults)
        guard_param_layout(self, type(self).__name__, "clips each parameter's lr by the RMS of its whole update")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; with ``decouple_lr`` its ``max_lr`` defaults to its ``lr`` (checked here, not in step)."""
        # a group's own options are checked as the constructor's, and max_lr against decouple_lr,
        # all before it is added (a refused group leaves nothing behind)
        checked = check_param_group(self, param_group)
        if isinstance(checked, dict):
            merged = {**self.defaults, **checked}
            if merged["max_lr"] is not None and not merged["decouple_lr"]:
                raise ValueError(
                    "StableAdamW(max_lr=...) only matters with decouple_lr=True; set decouple_lr=True or drop max_lr"
                )
            if merged["max_lr"] is None and merged["decouple_lr"]:
                if not isinstance(merged["lr"], Tensor) and merged["lr"] <= 0:
                    raise ValueError("StableAdamW(decouple_lr=True) needs max_lr when a group's lr is 0")
                checked = {**checked, "max_lr": merged["lr"]}
        super().add_param_group(checked)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        backfill_group_defaults(
            self, decouple_lr=False, max_lr=None, kahan_sum=False, stochastic_rounding=False, impl="auto"
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; ``closure`` is called once, with grad enabled."""
        loss = run_closure(closure)
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, comps, steps = [], [], [], [], [], []
            for p in params_with_grad(group, "StableAdamW"):
                state = self.state[p]
                init_state(state, p, "exp_avg", "exp_avg_sq", kahan_sum=group["kahan_sum"])
                state["step"] += 1
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                comps.append(state.get("kahan_comp") if group["kahan_sum"] else None)
                steps.append(state["step"])
            beta1, beta2 = group["betas"]
            stable_adamw(
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
                decouple_lr=group["decouple_lr"],
                max_lr=group["max_lr"],
                stochastic=group["stochastic_rounding"],
                impl=group["impl"],
            )
        return loss


register(
    OptimInfo(
        name="stable_adamw",
        cls=StableAdamW,
        description="StableAdamW: AdamW with per-tensor update clipping (replaces grad clipping)",
        paper="Wortsman et al., arXiv:2304.13013",
        default_lr=1e-3,
    )
)
