"""StableAdamW: AdamW with per-tensor update clipping (Wortsman et al. 2023, arXiv:2304.13013).

Registered as ``stable_adamw`` (also Hugging Face's name for it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_opt.optim.precision import apply_update_, compute_dtype
from lightning_opt.optim.base import (
    backfill_group_defaults,
    check_betas,
    check_flag,
    check_lr_wd,
    init_state,
    params_with_grad,
    run_closure,
)
from lightning_opt.optim.registry import OptimInfo, register

__all__ = ["StableAdamW", "debias_beta", "stable_adamw_update_"]


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
) -> Tensor:
    """One StableAdamW step for one tensor (``step`` is 1-based); returns the clipped lr (0-d tensor).

    ``m`` and ``v`` are EMAs with debiased betas (so they are the bias-corrected moments);
    ``RMS = sqrt(mean(g^2 / max(v, eps^2)))``; ``lr_t = lr / max(1, RMS)``; decay
    ``p *= 1 - lr_t wd`` (or ``1 - (lr_t / max_lr) wd`` with ``decouple_lr``); then
    ``p -= lr_t m / (sqrt(v) + eps)``. No host sync: ``lr_t`` stays a tensor.
    """
    dt = compute_dtype(param)
    g = grad.to(dt)
    m = exp_avg.to(dt)
    v = exp_avg_sq.to(dt)
    b1, b2 = debias_beta(beta1, step), debias_beta(beta2, step)
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    rms = (g * g).div_(v.clamp(min=eps * eps)).mean().sqrt()
    lr_t = lr / rms.clamp(min=1.0)
    if weight_decay != 0:
        scale = lr_t / max_lr if decouple_lr else lr_t
        param.mul_(1 - scale * weight_decay)
    delta = (m / (v.sqrt().add_(eps))).mul_(-lr_t)
    if m is not exp_avg:
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
    apply_update_(param, delta, kahan_comp)
    return lr_t


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

    Raises:
        ValueError: invalid ``lr``, ``weight_decay``, ``eps``, betas or ``max_lr`` (also in
            ``add_param_group``); ``decouple_lr`` or ``kahan_sum`` not a bool.

    Example:
        >>> opt = StableAdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

    Equal to ``optimi.StableAdamW`` with the same options. Paper: Wortsman et al., "Stable and
    low-precision training for large-scale vision-language models", arXiv:2304.13013.
    """

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
            "kahan_sum": check_flag("StableAdamW", "kahan_sum", kahan_sum),
        }
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; with ``decouple_lr`` its ``max_lr`` defaults to its ``lr`` (checked here, not in step)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        max_lr = group["max_lr"]
        if max_lr is not None:
            if not isinstance(max_lr, (int, float)) or not math.isfinite(max_lr) or max_lr <= 0:
                raise ValueError(f"StableAdamW(max_lr={max_lr!r}) is invalid; it must be a finite number > 0 (or None)")
            if not group["decouple_lr"]:
                raise ValueError(
                    "StableAdamW(max_lr=...) only matters with decouple_lr=True; set decouple_lr=True or drop max_lr"
                )
        elif group["decouple_lr"]:
            if group["lr"] <= 0:
                raise ValueError("StableAdamW(decouple_lr=True) needs max_lr when a group's lr is 0")
            group["max_lr"] = group["lr"]

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        backfill_group_defaults(self, decouple_lr=False, max_lr=None, kahan_sum=False)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; ``closure`` is called once, with grad enabled."""
        loss = run_closure(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in params_with_grad(group, "StableAdamW"):
                state = self.state[p]
                init_state(state, p, "exp_avg", "exp_avg_sq", kahan_sum=group["kahan_sum"])
                state["step"] += 1
                stable_adamw_update_(
                    p,
                    p.grad,
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    step=state["step"],
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    decouple_lr=group["decouple_lr"],
                    max_lr=group["max_lr"],
                    kahan_comp=state.get("kahan_comp") if group["kahan_sum"] else None,
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
