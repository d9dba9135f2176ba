"""Lion: the sign of an interpolated momentum (Chen et al. 2023, arXiv:2302.06675).

Registered as ``lion``; Hugging Face's ``lion_32bit`` and DeepSpeed's ``Lion``/``LionOptimizer``
resolve to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_opt.optim._kahan import apply_update_, compute_dtype
from lightning_opt.optim.base import (
    backfill_group_defaults,
    check_betas,
    check_flag,
    check_lr_wd,
    init_state,
    params_with_grad,
    run_closure,
)
from lightning_opt.optim.registry import OptimInfo, register, register_alias

__all__ = ["Lion", "lion_update_"]


def lion_update_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    kahan_comp: Tensor | None = None,
) -> None:
    """One Lion step for one tensor, in place on ``param`` and ``exp_avg``.

    ``p <- p (1 - lr wd)``; ``c = b1 m + (1 - b1) g``; ``p <- p - lr sign(c)``;
    ``m <- b2 m + (1 - b2) g``. The math runs in float32 for bf16/fp16 tensors; ``exp_avg`` keeps
    its dtype. With ``kahan_comp`` (a buffer in ``param``'s dtype) the step is Kahan-compensated.
    """
    dt = compute_dtype(param)
    g = grad.to(dt)
    m = exp_avg.to(dt)  # the same tensor when no cast is needed
    if weight_decay != 0:
        # outside the compensation, as in the paper and torch-optimi
        param.mul_(1 - lr * weight_decay)
    update = (m * beta1).add_(g, alpha=1 - beta1).sign_()
    m.mul_(beta2).add_(g, alpha=1 - beta2)
    if m is not exp_avg:
        exp_avg.copy_(m)
    apply_update_(param, update.mul_(-lr), kahan_comp)


class Lion(Optimizer):
    """Lion (EvoLved Sign Momentum): every coordinate moves by ``lr`` in the sign of the momentum.

    Args:
        params: parameters or param-group dicts (extra keys such as ``param_names`` pass through).
        lr: learning rate (default ``1e-4``; use 3-10x less than AdamW's).
        betas: ``(beta1, beta2)``, the interpolation used for the update and the momentum decay
            (default ``(0.9, 0.99)``).
        weight_decay: decoupled weight decay, applied as ``p *= 1 - lr * weight_decay`` (default
            ``0.0``; use 3-10x more than AdamW's).
        kahan_sum: Kahan-compensate the updates of bf16/fp16 parameters, so updates below their
            resolution are not lost (default ``False``; float32 parameters need and get no buffer).

    Raises:
        ValueError: negative or non-finite ``lr``/``weight_decay``, betas outside [0, 1), ``kahan_sum``
            not a bool.

    Example:
        >>> opt = Lion(model.parameters(), lr=1e-4, weight_decay=0.1)

    The math matches ``lion_pytorch.Lion`` and google/automl's reference; the state is one
    ``exp_avg`` per parameter (plus ``kahan_comp`` with ``kahan_sum``). Paper: Chen et al.,
    "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        kahan_sum: bool = False,
    ) -> None:
        check_lr_wd("Lion", lr, weight_decay)
        betas = check_betas("Lion", betas)
        kahan_sum = check_flag("Lion", "kahan_sum", kahan_sum)
        defaults = {"lr": lr, "betas": betas, "weight_decay": weight_decay, "kahan_sum": kahan_sum}
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        backfill_group_defaults(self, kahan_sum=False)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; ``closure`` (re-evaluating the loss) is called once, with grad enabled."""
        loss = run_closure(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in params_with_grad(group, "Lion"):
                state = self.state[p]
                init_state(state, p, "exp_avg", step=False, kahan_sum=group["kahan_sum"])
                lion_update_(
                    p,
                    p.grad,
                    state["exp_avg"],
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    weight_decay=group["weight_decay"],
                    kahan_comp=state.get("kahan_comp") if group["kahan_sum"] else None,
                )
        return loss


register(
    OptimInfo(
        name="lion",
        cls=Lion,
        description="Lion: sign of interpolated momentum, decoupled weight decay",
        paper="Chen et al., arXiv:2302.06675",
        default_lr=1e-4,
    )
)
register_alias("lion_32bit", "lion", source="huggingface")
# DeepSpeed's "Lion" is our name already (names match case-insensitively)
register_alias("LionOptimizer", "lion", source="deepspeed")
