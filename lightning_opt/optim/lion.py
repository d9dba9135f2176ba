"""Lion: the sign of an interpolated momentum (Chen et al. 2023, arXiv:2302.06675).

Registered as ``lion``; Hugging Face's ``lion_32bit`` and DeepSpeed's ``Lion``/``LionOptimizer``
resolve to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_opt.optim.base import (
    backfill_group_defaults,
    check_betas,
    check_lr_wd,
    check_param_group,
    check_rounding,
    init_state,
    params_with_grad,
    real_view,
    run_closure,
)
from lightning_opt.optim.engine import Impl, check_impl, dispatch
from lightning_opt.optim.precision import (
    LOW_PRECISION,
    apply_update_,
    apply_updates_,
    compute_dtype,
    count_sr_step,
    sr_keys,
)
from lightning_opt.optim.registry import OptimInfo, register, register_alias

__all__ = ["LION_IMPLS", "Lion", "lion", "lion_update_"]


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
    stochastic: bool = False,
    seed: int = 0,
) -> None:
    """One Lion step for one tensor, in place on ``param`` and ``exp_avg`` (the reference).

    ``p <- p (1 - lr wd)``; ``c = b1 m + (1 - b1) g``; ``p <- p - lr sign(c)``;
    ``m <- b2 m + (1 - b2) g``. The math runs in float32 for bf16/fp16 tensors; ``exp_avg`` keeps
    its dtype. With ``kahan_comp`` (a buffer in ``param``'s dtype) the step is Kahan-compensated,
    with ``stochastic`` a bf16 parameter is stochastically rounded with bits of ``seed`` (its step
    count, see ``precision``).
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
    apply_update_(param, update.mul_(-lr), kahan_comp, stochastic=stochastic, seed=seed)


def _lion_for_loop(params, grads, exp_avgs, kahan_comps, steps, **hp: Any) -> None:
    for p, g, m, c, s in zip(params, grads, exp_avgs, kahan_comps, steps):
        lion_update_(p, g, m, kahan_comp=c, seed=s, **hp)


def _lion_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    kahan_comps: list[Tensor | None],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    stochastic: bool = False,
) -> None:
    low = params[0].dtype in LOW_PRECISION
    g = [x.float() for x in grads] if low else grads
    m = [x.float() for x in exp_avgs] if low else exp_avgs
    if weight_decay != 0:
        if low:
            # the CPU's foreach ops round a scalar to the tensors' dtype first (0.998 -> 0.99609375
            # in bf16): decay in float32 and round once, as lion_update_'s param.mul_ does
            torch._foreach_copy_(params, torch._foreach_mul([p.float() for p in params], 1 - lr * weight_decay))
        else:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
    update = torch._foreach_mul(m, beta1)
    torch._foreach_add_(update, g, alpha=1 - beta1)
    torch._foreach_sign_(update)
    torch._foreach_mul_(m, beta2)
    torch._foreach_add_(m, g, alpha=1 - beta2)
    if low:
        torch._foreach_copy_(exp_avgs, m)
    torch._foreach_mul_(update, -lr)
    apply_updates_(params, update, kahan_comps, stochastic=stochastic, seeds=steps)


def _lion_fused(params, grads, exp_avgs, kahan_comps, steps, *, lr, beta1, beta2, weight_decay, stochastic=False) -> None:
    from lightning_opt.kernels import cpu

    # ip: the stochastic-rounding switch, then (with it) each tensor's seed key (csrc/lion.c)
    ip = [int(stochastic), *sr_keys(stochastic, steps, len(params))]
    cpu.launch("lion", "lion", [params, grads, exp_avgs, kahan_comps], [lr, beta1, beta2, weight_decay], ip)


def _lion_triton(params, grads, exp_avgs, kahan_comps, steps, *, lr, beta1, beta2, weight_decay, stochastic=False) -> None:
    from lightning_opt.kernels.triton_lion import lion_triton_

    lion_triton_(
        params, grads, exp_avgs, kahan_comps, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
        stochastic=stochastic, steps=steps,
    )


#: Lion's implementations, by ``impl`` name (``for_loop`` is the reference)
LION_IMPLS = {"for_loop": _lion_for_loop, "foreach": _lion_foreach, "fused": _lion_fused, "triton": _lion_triton}


def lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    kahan_comps: list[Tensor | None],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    stochastic: bool = False,
    steps: list[int] | None = None,
    impl: str = "auto",
) -> None:
    """Lion over tensor lists (the functional API): :func:`lion_update_` for every tensor, by ``impl``.

    ``steps``: each tensor's step count, the seed of its stochastic rounding (``None``: 0 for all).
    """
    dispatch(
        "Lion",
        "lion",
        impl,
        LION_IMPLS,
        {
            "params": params,
            "grads": grads,
            "exp_avgs": exp_avgs,
            "kahan_comps": kahan_comps,
            "steps": [0] * len(params) if steps is None else steps,
        },
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        stochastic=stochastic,
    )


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
        stochastic_rounding: round the updated bf16 parameters stochastically instead (default
            ``False``; no extra memory; exclusive with ``kahan_sum``).
        impl: ``"auto"`` (default: the fused CPU kernel on the CPU, Triton on CUDA), ``"for_loop"``,
            ``"foreach"``, ``"fused"`` or ``"triton"`` (see :mod:`lightning_opt.optim.engine`).

    Raises:
        ValueError: negative or non-finite ``lr``/``weight_decay``, betas outside [0, 1), a flag
            not a bool, both roundings, an unknown ``impl``.

    Example:
        >>> opt = Lion(model.parameters(), lr=1e-4, weight_decay=0.1)

    The math matches ``lion_pytorch.Lion`` and google/automl's reference; the state is one
    ``exp_avg`` per parameter (plus ``kahan_comp`` with ``kahan_sum``, and with
    ``stochastic_rounding`` an int ``step`` per bf16 parameter: the seed of its rounding, so a weight
    taking the same update again draws fresh bits; a checkpoint without it resumes at 0). Paper: Chen et al.,
    "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675.
    """

    #: the ``impl`` values this class takes besides ``"auto"`` (the contract suite runs each)
    impls: ClassVar[tuple[str, ...]] = tuple(LION_IMPLS)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        kahan_sum: bool = False,
        stochastic_rounding: bool = False,
        impl: Impl = "auto",
    ) -> None:
        check_lr_wd("Lion", lr, weight_decay)
        betas = check_betas("Lion", betas)
        defaults = {
            "lr": lr,
            "betas": betas,
            "weight_decay": weight_decay,
            **check_rounding("Lion", kahan_sum, stochastic_rounding),
            "impl": check_impl("Lion", impl, tuple(LION_IMPLS)),
        }
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its own options are checked first, as the constructor's (a refused group is not added)."""
        super().add_param_group(check_param_group(self, param_group))

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        backfill_group_defaults(self, kahan_sum=False, stochastic_rounding=False, impl="auto")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; ``closure`` (re-evaluating the loss) is called once, with grad enabled."""
        loss = run_closure(closure)
        for group in self.param_groups:
            params, grads, exp_avgs, comps, steps = [], [], [], [], []
            for p in params_with_grad(group, "Lion"):
                state = self.state[p]
                init_state(state, p, "exp_avg", step=False, kahan_sum=group["kahan_sum"])
                steps.append(count_sr_step(state, p, group["stochastic_rounding"]))
                # elementwise: a complex tensor steps as its (real, imag) pair, as torch's optimizers
                params.append(real_view(p))
                grads.append(real_view(p.grad))
                exp_avgs.append(real_view(state["exp_avg"]))
                comps.append(state.get("kahan_comp") if group["kahan_sum"] else None)
            beta1, beta2 = group["betas"]
            lion(
                params,
                grads,
                exp_avgs,
                comps,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                stochastic=group["stochastic_rounding"],
                steps=steps,
                impl=group["impl"],
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
