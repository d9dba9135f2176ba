"""Schedule-Free AdamW, SGD and RAdam (Defazio et al. 2024, "The Road Less Scheduled", arXiv:2405.15682).

Registered as ``schedule_free_adamw``, ``schedule_free_sgd`` and ``schedule_free_radam`` (Hugging
Face's ``optim`` strings are the same names). No learning-rate schedule is needed: the optimizer
keeps three sequences per parameter,

- ``z``: the base optimizer's iterate, ``z <- z - lr_t * d(y)`` (``d`` is the gradient for SGD, the
  Adam-normalised gradient for AdamW/RAdam, plus ``weight_decay * y``);
- ``x``: the weighted average of the ``z``, ``x <- (1 - c) x + c z`` with
  ``c = w_t / sum(w)``, ``w_t = t**r * lr_max**weight_lr_power``; this is the point to evaluate;
- ``y = (1 - beta) z + beta x``: where gradients are taken; the parameters hold ``y`` in train
  mode and ``x`` in eval mode.

Only ``y`` (in the parameter) and ``z`` (state) are stored; ``x`` is implicit. ``optimizer.eval()``
turns the parameters into ``x`` and ``optimizer.train()`` turns them back into ``y``. Unlike the
``schedulefree`` package, a new optimizer starts in **train** mode (so a plain ``step()`` works);
:class:`lightning_opt.callbacks.ScheduleFreeMode` switches to eval for validation, test, predict and
checkpoint saving and back to train after, and is added automatically by ``OptimizerMixin``.

The group-level state ``k`` (steps taken), ``weight_sum``, ``lr_max``, ``train_mode`` and
``scheduled_lr`` lives in ``param_groups`` and is saved with ``state_dict()``.

The step has one per-tensor reference (:func:`schedule_free_step_`, ``impl="for_loop"``) and
list-level implementations that equal it (``"foreach"``; ``"fused"``: one C kernel pass over
``y``, the gradient, ``z`` and ``v`` per bucket, the default on the CPU; ``"triton"``: one launch per
bucket, the default on CUDA; see :mod:`lightning_opt.optim.engine`). :func:`schedule_free_adamw`,
:func:`schedule_free_sgd` and :func:`schedule_free_radam` are the functional APIs. The mode
switches are per tensor.

Differences from ``schedulefree`` 1.4.1 (same math otherwise): the gradient is not modified in
place; bf16/fp16 parameters get float32 ``z``/``exp_avg_sq`` and float32 math, and their ``y`` may be
stored with stochastic rounding (``stochastic_rounding=True``, its bits seeded by the group's step
``k + 1``, the same for every tensor of the group; ``z`` is a float32 master copy, so there is no
Kahan option).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_opt.optim.base import (
    LOW_PRECISION,
    OptionCheck,
    as_option_check,
    backfill_group_defaults,
    check_flag,
    check_param_group,
    keep_state_dtype_on_load,
    params_with_grad,
    real_view,
    run_closure,
)
from lightning_opt.optim.engine import Impl, check_impl, dispatch
from lightning_opt.optim.precision import exact_sqrt_, sr_keys, store_
from lightning_opt.optim.registry import OptimInfo, register

__all__ = [
    "SCHEDULE_FREE_IMPLS",
    "AdamWScheduleFree",
    "Direction",
    "RAdamScheduleFree",
    "SGDScheduleFree",
    "ScheduleFreeBase",
    "adam_direction",
    "average_weight",
    "radam_rectification",
    "schedule_free_adamw",
    "schedule_free_radam",
    "schedule_free_sgd",
    "schedule_free_step_",
    "schedule_free_update_",
    "to_eval_",
    "to_train_",
]

#: The base optimizer's direction: the raw gradient (``"sgd"``), Adam's normalised gradient
#: (``"adam"``), or the raw gradient while the squared-gradient EMA accumulates (``"ema"``: RAdam's
#: SGD phase).
Direction = Literal["sgd", "adam", "ema"]


# --------------------------------------------------------------------------------------------------
# the math, as plain functions of tensors and numbers


def average_weight(
    k: int, lr: float, lr_max: float, weight_sum: float, *, r: float, weight_lr_power: float
) -> tuple[float, float, float]:
    """The averaging coefficient of step ``k`` (0-based): returns ``(c, lr_max, weight_sum)`` updated.

    ``lr_max = max(lr_max, lr)``; ``w = (k + 1)**r * lr_max**weight_lr_power``;
    ``weight_sum += w``; ``c = w / weight_sum`` (0 while every weight is 0, e.g. ``lr = 0``).
    """
    lr_max = max(lr_max, lr)
    weight = ((k + 1) ** r) * (lr_max**weight_lr_power)
    weight_sum = weight_sum + weight
    c = weight / weight_sum if weight_sum != 0 else 0.0
    return c, lr_max, weight_sum


def radam_rectification(step: int, beta2: float) -> float | None:
    """RAdam's variance rectification ``r_t`` at 1-based ``step``, or ``None`` while ``rho_t <= 4``.

    ``rho_inf = 2 / (1 - beta2) - 1``; ``rho_t = rho_inf - 2 t beta2**t / (1 - beta2**t)``;
    ``r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))``. The threshold
    is 4 as in the RAdam paper and ``schedulefree`` (torch's RAdam uses 5).
    """
    beta2_t = beta2**step
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * step * beta2_t / (1.0 - beta2_t)
    if rho_t <= 4.0:
        return None
    return math.sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))


def adam_direction(grad: Tensor, exp_avg_sq: Tensor, *, beta2: float, bias_correction2: float, eps: float) -> Tensor:
    """Update ``exp_avg_sq`` in place (EMA of ``grad**2``) and return ``grad / (sqrt(v / bc2) + eps)``."""
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = exact_sqrt_(exp_avg_sq.div(bias_correction2)).add_(eps)
    return grad.div(denom)


def schedule_free_update_(y: Tensor, z: Tensor, direction: Tensor, *, lr: float, beta: float, c: float) -> None:
    """One schedule-free step on ``y`` (the parameter, train mode) and ``z``, in place.

    With ``x = (y - (1 - beta) z) / beta``: ``z' = z - lr d``, ``x' = (1 - c) x + c z'`` and
    ``y' = (1 - beta) z' + beta x'``, which simplifies to ``y' = y + c (z - y) + lr (beta (1 - c) - 1) d``.
    """
    y.lerp_(z, c)
    y.add_(direction, alpha=lr * (beta * (1.0 - c) - 1.0))
    z.sub_(direction, alpha=lr)


def schedule_free_step_(
    param: Tensor,
    grad: Tensor,
    z: Tensor,
    exp_avg_sq: Tensor | None,
    *,
    direction: Direction,
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
    """One schedule-free step for one tensor (the reference), in place on ``param`` (``y``), ``z``, ``exp_avg_sq``.

    The direction ``d`` is the gradient (``"sgd"``, ``"ema"``: ``exp_avg_sq`` still accumulates
    ``g**2``) or :func:`adam_direction` (``"adam"``), plus ``weight_decay * y`` (decay computed at
    ``y``, schedulefree >= 1.3); then :func:`schedule_free_update_`. The math runs in ``z``'s dtype
    (float32 for bf16/fp16 parameters), and ``stochastic`` rounds a bf16 ``y`` stochastically when
    it is stored, with bits seeded by ``seed`` (the optimizers pass the group's 1-based step, see
    ``precision``). ``grad`` is not modified. ``exp_avg_sq`` is unused (may be ``None``) for ``"sgd"``.
    """
    y = param if param.dtype == z.dtype else param.to(z.dtype)
    g = grad.to(z.dtype)
    if direction == "adam":
        d = adam_direction(g, exp_avg_sq, beta2=beta2, bias_correction2=bias_correction2, eps=eps)
    else:
        if direction == "ema":
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        d = g
    if weight_decay != 0:
        d = d.add(y, alpha=weight_decay) if d is grad else d.add_(y, alpha=weight_decay)
    schedule_free_update_(y, z, d, lr=lr, beta=beta, c=c)
    if y is not param:
        store_(param, y, stochastic=stochastic, seed=seed)


def to_eval_(y: Tensor, z: Tensor, beta: float) -> None:
    """Turn the train point ``y`` into the average ``x = y + (1 - 1/beta)(z - y)``, in place."""
    y.lerp_(z, 1.0 - 1.0 / beta)


def to_train_(x: Tensor, z: Tensor, beta: float) -> None:
    """Turn the average ``x`` into the train point ``y = x + (1 - beta)(z - x)``, in place."""
    x.lerp_(z, 1.0 - beta)


# --------------------------------------------------------------------------------------------------
# the implementations: one signature, per (device, dtype) bucket (lightning_opt.optim.engine)


def _schedule_free_for_loop(params, grads, zs, exp_avg_sqs, **hp: Any) -> None:
    for p, g, z, v in zip(params, grads, zs, exp_avg_sqs):
        schedule_free_step_(p, g, z, v, **hp)


def _schedule_free_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    zs: list[Tensor],
    exp_avg_sqs: list[Tensor | None],
    *,
    direction: Direction,
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
    zs = list(zs)
    low = params[0].dtype != zs[0].dtype
    ys = [p.to(z.dtype) for p, z in zip(params, zs)] if low else list(params)
    gs = [g.to(z.dtype) for g, z in zip(grads, zs)] if low else list(grads)
    if direction != "sgd":
        vs = list(exp_avg_sqs)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
    if direction == "adam":
        denom = torch._foreach_div(vs, bias_correction2)
        if denom[0].dtype == torch.float32 and denom[0].device.type == "cpu":
            for x in denom:
                exact_sqrt_(x)
        else:
            torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        d = torch._foreach_div(gs, denom)
    else:
        d = gs
    if weight_decay != 0:
        if d is gs and not low:  # d would be the gradients themselves
            d = torch._foreach_add(gs, ys, alpha=weight_decay)
        else:
            torch._foreach_add_(d, ys, alpha=weight_decay)
    torch._foreach_lerp_(ys, zs, c)
    torch._foreach_add_(ys, d, alpha=lr * (beta * (1.0 - c) - 1.0))
    torch._foreach_sub_(zs, d, alpha=lr)
    if low:
        if stochastic and params[0].dtype == torch.bfloat16:
            for p, y in zip(params, ys):
                store_(p, y, stochastic=True, seed=seed)
        else:
            torch._foreach_copy_(params, ys)


_MODES = {"sgd": 0, "adam": 1, "ema": 2}


def _schedule_free_fused(
    params,
    grads,
    zs,
    exp_avg_sqs,
    *,
    direction,
    lr,
    beta,
    beta2,
    eps,
    bias_correction2,
    weight_decay,
    c,
    stochastic=False,
    seed=0,
) -> None:
    from lightning_opt.kernels import cpu

    cpu.launch(
        "schedule_free",
        "schedule_free",
        [params, grads, zs, exp_avg_sqs],
        [lr * (beta * (1.0 - c) - 1.0), lr, beta2, eps, bias_correction2, weight_decay, c],
        # the direction, the switch, then (with it) each tensor's seed key (csrc/schedule_free.c)
        [_MODES[direction], int(stochastic), *sr_keys(stochastic, [seed] * len(params), len(params))],
        state_dtype=zs[0].dtype,
    )


def _schedule_free_triton(params, grads, zs, exp_avg_sqs, **hp: Any) -> None:
    from lightning_opt.kernels.triton_schedule_free import schedule_free_triton_

    schedule_free_triton_(params, grads, zs, exp_avg_sqs, **hp)


#: the schedule-free implementations, by ``impl`` name (``for_loop`` is the reference), shared by
#: the three variants (they differ in the direction only)
SCHEDULE_FREE_IMPLS = {
    "for_loop": _schedule_free_for_loop,
    "foreach": _schedule_free_foreach,
    "fused": _schedule_free_fused,
    "triton": _schedule_free_triton,
}


def _schedule_free(cls: str, params, grads, zs, exp_avg_sqs, impl: str, **hp: Any) -> None:
    dispatch(
        cls,
        "schedule_free",
        impl,
        SCHEDULE_FREE_IMPLS,
        {"params": params, "grads": grads, "zs": zs, "exp_avg_sqs": exp_avg_sqs},
        **hp,
    )


def schedule_free_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    zs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    lr: float,
    beta: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    c: float,
    step: int,
    stochastic: bool = False,
    impl: str = "auto",
) -> None:
    """Schedule-Free AdamW over tensor lists (the functional API), by ``impl``.

    ``lr`` is the step's (warmed-up) lr, ``c`` the averaging coefficient (:func:`average_weight`),
    ``step`` the 1-based step (for the bias correction ``1 - beta2**step``, and the seed of the
    stochastic rounding).
    """
    _schedule_free(
        "AdamWScheduleFree",
        params,
        grads,
        zs,
        exp_avg_sqs,
        impl,
        direction="adam",
        lr=lr,
        beta=beta,
        beta2=beta2,
        eps=eps,
        bias_correction2=1.0 - beta2**step,
        weight_decay=weight_decay,
        c=c,
        stochastic=stochastic,
        seed=step,
    )


def schedule_free_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    zs: list[Tensor],
    *,
    lr: float,
    beta: float,
    weight_decay: float,
    c: float,
    stochastic: bool = False,
    step: int = 0,
    impl: str = "auto",
) -> None:
    """Schedule-Free SGD over tensor lists (the functional API), by ``impl``; ``beta`` is the momentum,
    ``step`` the 1-based step (the seed of the stochastic rounding)."""
    _schedule_free(
        "SGDScheduleFree",
        params,
        grads,
        zs,
        [None] * len(params),
        impl,
        direction="sgd",
        lr=lr,
        beta=beta,
        beta2=0.0,
        eps=0.0,
        bias_correction2=1.0,
        weight_decay=weight_decay,
        c=c,
        stochastic=stochastic,
        seed=step,
    )


def schedule_free_radam(
    params: list[Tensor],
    grads: list[Tensor],
    zs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    lr: float,
    beta: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    c: float,
    step: int,
    stochastic: bool = False,
    impl: str = "auto",
) -> None:
    """Schedule-Free RAdam over tensor lists (the functional API), by ``impl``.

    ``lr`` already includes the rectification (:func:`radam_rectification`, 0 or 1 in the SGD
    phase); while the rectification is undefined at the 1-based ``step`` the direction is the raw
    gradient and the squared-gradient EMA still accumulates; ``step`` also seeds the stochastic
    rounding.
    """
    _schedule_free(
        "RAdamScheduleFree",
        params,
        grads,
        zs,
        exp_avg_sqs,
        impl,
        direction="ema" if radam_rectification(step, beta2) is None else "adam",
        lr=lr,
        beta=beta,
        beta2=beta2,
        eps=eps,
        bias_correction2=1.0 - beta2**step,
        weight_decay=weight_decay,
        c=c,
        stochastic=stochastic,
        seed=step,
    )


# --------------------------------------------------------------------------------------------------
# validation


def _check_number(cls: str, key: str, value: Any, *, low: float = 0.0, integer: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= low
    if integer:
        ok = ok and isinstance(value, int)
    if not ok:
        what = "an integer" if integer else "a finite number"
        raise ValueError(f"{cls}({key}={value!r}) is invalid; it must be {what} >= {low:g}")


def _check_interp(cls: str, key: str, value: Any) -> None:
    # eval() divides by beta, so 0 is not allowed
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{cls}({key}={value!r}) is invalid; it must lie in (0, 1) (try 0.9)")


def _check_betas(cls: str, betas: Any) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{cls}(betas={betas!r}) is invalid; expected (beta1, beta2), e.g. (0.9, 0.999)")
    _check_interp(cls, "betas[0]", betas[0])
    b2 = betas[1]
    if isinstance(b2, bool) or not isinstance(b2, (int, float)) or not 0 <= b2 < 1:
        raise ValueError(f"{cls}(betas={betas!r}) is invalid; beta2 must lie in [0, 1) (try 0.999)")
    return float(betas[0]), float(b2)


# --------------------------------------------------------------------------------------------------
# the optimizers


class ScheduleFreeBase(Optimizer):
    """Shared train/eval switching, state layout, options and the step loop of the schedule-free optimizers.

    Subclasses define ``_beta(group)`` (the interpolation ``beta``), ``_lr(group, k)`` (the step's
    lr, e.g. warmed up) and ``_update(group, k, lr, c, params, grads, zs, exp_avg_sqs)`` (calls the
    variant's list-level function); ``_has_exp_avg_sq`` says whether the state has ``exp_avg_sq``.
    """

    #: the ``impl`` values the schedule-free optimizers take besides ``"auto"``
    impls: ClassVar[tuple[str, ...]] = tuple(SCHEDULE_FREE_IMPLS)
    _has_exp_avg_sq: ClassVar[bool] = False
    #: group options with the constructors' own checks (base.check_param_group runs them on a group)
    option_checks: ClassVar[dict[str, OptionCheck]] = {
        "betas": lambda cls, key, value: _check_betas(cls, value),
        "momentum": as_option_check(_check_interp),
        "warmup_steps": as_option_check(_check_number, integer=True),
        "r": as_option_check(_check_number),
        "weight_lr_power": as_option_check(_check_number),
    }

    def __init__(
        self, params: Iterable[Any], defaults: dict[str, Any], *, stochastic_rounding: bool = False, impl: str = "auto"
    ) -> None:
        name = type(self).__name__
        defaults = {
            **defaults,
            "stochastic_rounding": check_flag(name, "stochastic_rounding", stochastic_rounding),
            "impl": check_impl(name, impl, self.impls),
            "k": 0,
            "train_mode": True,
            "weight_sum": 0.0,
            "lr_max": -1.0,
            "scheduled_lr": 0.0,
        }
        super().__init__(params, defaults)
        keep_state_dtype_on_load(self)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its own options are checked as the constructor's, before it is added."""
        super().add_param_group(check_param_group(self, param_group))

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        backfill_group_defaults(self, stochastic_rounding=False, impl="auto")

    # -- hooks for subclasses
    def _beta(self, group: dict[str, Any]) -> float:
        raise NotImplementedError

    def _lr(self, group: dict[str, Any], k: int) -> float:
        return group["lr"]

    def _update(
        self,
        group: dict[str, Any],
        k: int,
        lr: float,
        c: float,
        params: list[Tensor],
        grads: list[Tensor],
        zs: list[Tensor],
        exp_avg_sqs: list[Tensor],
    ) -> None:
        raise NotImplementedError

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        dt = torch.float32 if p.dtype in LOW_PRECISION else p.dtype
        state["z"] = p.detach().to(dt, copy=True)
        if self._has_exp_avg_sq:
            state["exp_avg_sq"] = torch.zeros_like(state["z"], memory_format=torch.preserve_format)

    # -- mode switching
    @torch.no_grad()
    def eval(self) -> None:
        """Put the averaged weights ``x`` into the parameters (for evaluation and checkpoints)."""
        for group in self.param_groups:
            if group["train_mode"]:
                beta = self._beta(group)
                for p in group["params"]:
                    z = self.state[p].get("z")
                    if z is not None:
                        _apply_(p, z, beta, to_eval_)
                group["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        """Put the gradient point ``y`` back into the parameters (before training steps)."""
        for group in self.param_groups:
            if not group["train_mode"]:
                beta = self._beta(group)
                for p in group["params"]:
                    z = self.state[p].get("z")
                    if z is not None:
                        _apply_(p, z, beta, to_train_)
                group["train_mode"] = True

    @property
    def train_mode(self) -> bool:
        """Whether the parameters hold ``y`` (train) rather than ``x`` (eval)."""
        return all(g["train_mode"] for g in self.param_groups)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; ``closure`` (re-evaluating the loss) is called once, with grad enabled.

        Raises:
            RuntimeError: the optimizer is in eval mode (call ``optimizer.train()`` first).
        """
        if not all(g["train_mode"] for g in self.param_groups):
            raise RuntimeError(
                f"{type(self).__name__}.step() called in eval mode: the parameters hold the averaged "
                "weights x; call optimizer.train() before training (the ScheduleFreeMode callback does this)"
            )
        loss = run_closure(closure)
        for group in self.param_groups:
            k = group["k"]
            lr = self._lr(group, k)
            group["scheduled_lr"] = lr
            c, group["lr_max"], group["weight_sum"] = average_weight(
                k, lr, group["lr_max"], group["weight_sum"], r=group["r"], weight_lr_power=group["weight_lr_power"]
            )
            params, grads, zs, exp_avg_sqs = [], [], [], []
            for p in params_with_grad(group, type(self).__name__):
                state = self.state[p]
                if "z" not in state:
                    self._init_state(p, state)
                # elementwise: a complex tensor steps as its (real, imag) pair, as torch's optimizers
                params.append(real_view(p))
                grads.append(real_view(p.grad))
                zs.append(real_view(state["z"]))
                exp_avg_sqs.append(real_view(state.get("exp_avg_sq")))
            if params:
                self._update(group, k, lr, c, params, grads, zs, exp_avg_sqs)
            group["k"] = k + 1
        return loss


def _apply_(p: Tensor, z: Tensor, beta: float, fn: Callable[[Tensor, Tensor, float], None]) -> None:
    if p.dtype == z.dtype:
        fn(p, z.to(p.device), beta)
    else:
        y = p.to(z.dtype)
        fn(y, z, beta)
        p.copy_(y)


class AdamWScheduleFree(ScheduleFreeBase):
    """Schedule-Free AdamW: Adam's normalised gradient as the base step, no learning-rate schedule.

    Args:
        params: parameters or param-group dicts (extra keys such as ``param_names`` pass through).
        lr: learning rate (default ``0.0025``; 1-10x a scheduled AdamW's peak lr).
        betas: ``(beta1, beta2)``; ``beta1`` is the interpolation between ``z`` and ``x`` (there
            is no first moment), ``beta2`` the decay of the squared-gradient EMA (default
            ``(0.9, 0.999)``).
        eps: added to the denominator ``sqrt(v / bc2)`` (default ``1e-8``).
        weight_decay: decoupled decay computed at ``y``: ``d <- d + weight_decay * y`` (default ``0``).
        warmup_steps: linear warmup ``lr * min(1, (k + 1) / warmup_steps)`` (default ``0``).
        r: power of the step count in the averaging weight ``w_t = t**r * lr_max**weight_lr_power``
            (default ``0.0``).
        weight_lr_power: power of the largest lr so far in the averaging weight (default ``2.0``).
        stochastic_rounding: store the updated ``y`` of bf16 parameters with stochastic rounding
            (default ``False``: round to nearest; ``z`` is float32 either way).
        impl: ``"auto"`` (default: the fused CPU kernel on the CPU, Triton on CUDA),
            ``"for_loop"``, ``"foreach"``, ``"fused"`` or ``"triton"`` (see
            :mod:`lightning_opt.optim.engine`).

    Raises:
        ValueError: negative or non-finite ``lr``/``eps``/``weight_decay``/``r``/``weight_lr_power``,
            ``beta1`` outside (0, 1), ``beta2`` outside [0, 1), a negative or non-integer
            ``warmup_steps``, ``stochastic_rounding`` not a bool, an unknown ``impl``.
        RuntimeError: ``step()`` in eval mode.

    Example:
        >>> opt = AdamWScheduleFree(model.parameters(), lr=2.5e-3, warmup_steps=100)
        >>> opt.eval()   # before validation or saving: the parameters become x
        >>> opt.train()  # before training steps again

    Matches ``schedulefree.AdamWScheduleFree`` 1.4.1. Paper: Defazio et al., "The Road Less
    Scheduled", arXiv:2405.15682.
    """

    _has_exp_avg_sq = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        *,
        stochastic_rounding: bool = False,
        impl: Impl = "auto",
    ) -> None:
        name = type(self).__name__
        _check_number(name, "lr", lr)
        betas = _check_betas(name, betas)
        _check_number(name, "eps", eps)
        _check_number(name, "weight_decay", weight_decay)
        _check_number(name, "warmup_steps", warmup_steps, integer=True)
        _check_number(name, "r", r)
        _check_number(name, "weight_lr_power", weight_lr_power)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "warmup_steps": warmup_steps,
            "r": r,
            "weight_lr_power": weight_lr_power,
        }
        super().__init__(params, defaults, stochastic_rounding=stochastic_rounding, impl=impl)

    def _beta(self, group: dict[str, Any]) -> float:
        return group["betas"][0]

    def _lr(self, group: dict[str, Any], k: int) -> float:
        warmup = group["warmup_steps"]
        return group["lr"] * ((k + 1) / warmup if k < warmup else 1.0)

    def _update(self, group, k, lr, c, params, grads, zs, exp_avg_sqs) -> None:
        beta, beta2 = group["betas"]
        schedule_free_adamw(
            params,
            grads,
            zs,
            exp_avg_sqs,
            lr=lr,
            beta=beta,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            c=c,
            step=k + 1,
            stochastic=group["stochastic_rounding"],
            impl=group["impl"],
        )


class RAdamScheduleFree(ScheduleFreeBase):
    """Schedule-Free RAdam: rectified Adam as the base step, so no warmup is needed.

    While the rectification is undefined (``rho_t <= 4``, the first few steps) the step is plain
    SGD with the raw gradient, at lr 0 (``silent_sgd_phase=True``: ``z`` and ``y`` do not move,
    but the squared-gradient EMA accumulates) or at the full lr (``silent_sgd_phase=False``).

    Args:
        params: parameters or param-group dicts.
        lr: learning rate, multiplied by the rectification ``r_t`` (default ``0.0025``).
        betas: ``(beta1, beta2)``: interpolation and squared-gradient decay (default ``(0.9, 0.999)``).
        eps: added to the denominator (default ``1e-8``).
        weight_decay: decoupled decay computed at ``y`` (default ``0``).
        r: power of the step count in the averaging weight (default ``0.0``).
        weight_lr_power: power of the largest lr so far in the averaging weight (default ``2.0``).
        silent_sgd_phase: take no step while ``rho_t <= 4`` (default ``True``).
        stochastic_rounding: store bf16 parameters' ``y`` with stochastic rounding (default ``False``).
        impl: ``"auto"`` (default), ``"for_loop"``, ``"foreach"``, ``"fused"`` or ``"triton"``.

    Raises:
        ValueError: as :class:`AdamWScheduleFree` (there is no ``warmup_steps``).
        RuntimeError: ``step()`` in eval mode.

    Example:
        >>> opt = RAdamScheduleFree(model.parameters(), lr=2.5e-3)

    Matches ``schedulefree.RAdamScheduleFree`` 1.4.1. Paper: arXiv:2405.15682; RAdam: Liu et al.,
    arXiv:1908.03265.
    """

    _has_exp_avg_sq = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        silent_sgd_phase: bool = True,
        *,
        stochastic_rounding: bool = False,
        impl: Impl = "auto",
    ) -> None:
        name = type(self).__name__
        _check_number(name, "lr", lr)
        betas = _check_betas(name, betas)
        _check_number(name, "eps", eps)
        _check_number(name, "weight_decay", weight_decay)
        _check_number(name, "r", r)
        _check_number(name, "weight_lr_power", weight_lr_power)
        check_flag(name, "silent_sgd_phase", silent_sgd_phase)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "r": r,
            "weight_lr_power": weight_lr_power,
            "silent_sgd_phase": silent_sgd_phase,
        }
        super().__init__(params, defaults, stochastic_rounding=stochastic_rounding, impl=impl)

    def _beta(self, group: dict[str, Any]) -> float:
        return group["betas"][0]

    def _lr(self, group: dict[str, Any], k: int) -> float:
        rect = radam_rectification(k + 1, group["betas"][1])
        if rect is None:
            rect = 0.0 if group["silent_sgd_phase"] else 1.0
        return group["lr"] * rect

    def _update(self, group, k, lr, c, params, grads, zs, exp_avg_sqs) -> None:
        beta, beta2 = group["betas"]
        schedule_free_radam(
            params,
            grads,
            zs,
            exp_avg_sqs,
            lr=lr,
            beta=beta,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            c=c,
            step=k + 1,
            stochastic=group["stochastic_rounding"],
            impl=group["impl"],
        )


class SGDScheduleFree(ScheduleFreeBase):
    """Schedule-Free SGD: the raw gradient as the base step; ``momentum`` is the interpolation.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate (default ``1.0``; 10-50x a scheduled SGD's).
        momentum: the interpolation ``beta`` between ``z`` and ``x``, in (0, 1) (default ``0.9``).
        weight_decay: decay computed at ``y``: ``d <- g + weight_decay * y`` (default ``0``).
        warmup_steps: linear warmup of the lr (default ``0``).
        r: power of the step count in the averaging weight (default ``0.0``).
        weight_lr_power: power of the largest lr so far in the averaging weight (default ``2.0``).
        stochastic_rounding: store bf16 parameters' ``y`` with stochastic rounding (default ``False``).
        impl: ``"auto"`` (default), ``"for_loop"``, ``"foreach"``, ``"fused"`` or ``"triton"``.

    Raises:
        ValueError: ``momentum`` outside (0, 1), negative or non-finite numbers, a negative or
            non-integer ``warmup_steps``, ``stochastic_rounding`` not a bool, an unknown ``impl``.
        RuntimeError: ``step()`` in eval mode.

    Example:
        >>> opt = SGDScheduleFree(model.parameters(), lr=1.0, momentum=0.9, warmup_steps=50)

    Matches ``schedulefree.SGDScheduleFree`` 1.4.1. Paper: arXiv:2405.15682.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        *,
        stochastic_rounding: bool = False,
        impl: Impl = "auto",
    ) -> None:
        name = type(self).__name__
        _check_number(name, "lr", lr)
        _check_interp(name, "momentum", momentum)
        _check_number(name, "weight_decay", weight_decay)
        _check_number(name, "warmup_steps", warmup_steps, integer=True)
        _check_number(name, "r", r)
        _check_number(name, "weight_lr_power", weight_lr_power)
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "warmup_steps": warmup_steps,
            "r": r,
            "weight_lr_power": weight_lr_power,
        }
        super().__init__(params, defaults, stochastic_rounding=stochastic_rounding, impl=impl)

    def _beta(self, group: dict[str, Any]) -> float:
        return group["momentum"]

    def _lr(self, group: dict[str, Any], k: int) -> float:
        warmup = group["warmup_steps"]
        return group["lr"] * ((k + 1) / warmup if k < warmup else 1.0)

    def _update(self, group, k, lr, c, params, grads, zs, exp_avg_sqs) -> None:
        schedule_free_sgd(
            params,
            grads,
            zs,
            lr=lr,
            beta=group["momentum"],
            weight_decay=group["weight_decay"],
            c=c,
            stochastic=group["stochastic_rounding"],
            step=k + 1,
            impl=group["impl"],
        )


_PAPER = "Defazio et al., The Road Less Scheduled, arXiv:2405.15682"
register(
    OptimInfo(
        name="schedule_free_adamw",
        cls=AdamWScheduleFree,
        default_lr=0.0025,
        description="Schedule-Free AdamW (no LR schedule; eval() holds the averaged weights)",
        paper=_PAPER,
        callbacks=("lightning_opt.callbacks.schedule_free_mode:ScheduleFreeMode",),
        schedule_free=True,
    )
)
register(
    OptimInfo(
        name="schedule_free_sgd",
        cls=SGDScheduleFree,
        default_lr=1.0,
        description="Schedule-Free SGD (no LR schedule; eval() holds the averaged weights)",
        paper=_PAPER,
        callbacks=("lightning_opt.callbacks.schedule_free_mode:ScheduleFreeMode",),
        schedule_free=True,
    )
)
register(
    OptimInfo(
        name="schedule_free_radam",
        cls=RAdamScheduleFree,
        default_lr=0.0025,
        description="Schedule-Free RAdam (no LR schedule or warmup; eval() holds the averaged weights)",
        paper=_PAPER,
        callbacks=("lightning_opt.callbacks.schedule_free_mode:ScheduleFreeMode",),
        schedule_free=True,
    )
)
# Hugging Face TrainingArguments.optim uses our names ("schedule_free_adamw", ...); nothing to alias
