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

Differences from ``schedulefree`` 1.4.1 (same math otherwise): the gradient is not modified in
place; bf16/fp16 parameters get float32 ``z``/``exp_avg_sq`` and float32 math.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_opt.optim.base import (
    LOW_PRECISION,
    check_flag,
    params_with_grad,
    run_closure,
    keep_state_dtype_on_load,
)
from lightning_opt.optim.registry import OptimInfo, register

__all__ = [
    "AdamWScheduleFree",
    "RAdamScheduleFree",
    "SGDScheduleFree",
    "ScheduleFreeBase",
    "adam_direction",
    "average_weight",
    "radam_rectification",
    "schedule_free_update_",
    "to_eval_",
    "to_train_",
]



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
    denom = exp_avg_sq.div(bias_correction2).sqrt_().add_(eps)
    return grad.div(denom)


def schedule_free_update_(y: Tensor, z: Tensor, direction: Tensor, *, lr: float, beta: float, c: float) -> None:
    """One schedule-free step on ``y`` (the parameter, train mode) and ``z``, in place.

    With ``x = (y - (1 - beta) z) / beta``: ``z' = z - lr d``, ``x' = (1 - c) x + c z'`` and
    ``y' = (1 - beta) z' + beta x'``, which simplifies to ``y' = y + c (z - y) + lr (beta (1 - c) - 1) d``.
    """
    y.lerp_(z, c)
    y.add_(direction, alpha=lr * (beta * (1.0 - c) - 1.0))
    z.sub_(direction, alpha=lr)


def to_eval_(y: Tensor, z: Tensor, beta: float) -> None:
    """Turn the train point ``y`` into the average ``x = y + (1 - 1/beta)(z - y)``, in place."""
    y.lerp_(z, 1.0 - 1.0 / beta)


def to_train_(x: Tensor, z: Tensor, beta: float) -> None:
    """Turn the average ``x`` into the train point ``y = x + (1 - beta)(z - x)``, in place."""
    x.lerp_(z, 1.0 - beta)


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
    """Shared train/eval switching, state layout and the step loop of the schedule-free optimizers.

    Subclasses define ``_beta(group)`` (the interpolation ``beta``), ``_lr(group, k)`` (the step's
    lr, e.g. warmed up) and ``_direction(group, k, grad, state)`` (the base optimizer's direction
    without weight decay, or ``None`` for the raw gradient).
    """

    _state_keys: tuple[str, ...] = ("z",)

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        defaults = {**defaults, "k": 0, "train_mode": True, "weight_sum": 0.0, "lr_max": -1.0, "scheduled_lr": 0.0}
        super().__init__(params, defaults)
        keep_state_dtype_on_load(self)

    # -- hooks for subclasses
    def _beta(self, group: dict[str, Any]) -> float:
        raise NotImplementedError

    def _lr(self, group: dict[str, Any], k: int) -> float:
        return group["lr"]

    def _direction(self, group: dict[str, Any], k: int, grad: Tensor, state: dict[str, Any]) -> Tensor:
        raise NotImplementedError

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        dt = torch.float32 if p.dtype in LOW_PRECISION else p.dtype
        state["z"] = p.detach().to(dt, copy=True)

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
            beta = self._beta(group)
            wd = group["weight_decay"]
            for p in params_with_grad(group, type(self).__name__):
                state = self.state[p]
                if "z" not in state:
                    self._init_state(p, state)
                z = state["z"]
                y = p if p.dtype == z.dtype else p.to(z.dtype)
                grad = p.grad.to(z.dtype)
                d = self._direction(group, k, grad, state)
                if d is grad:
                    d = grad.clone() if grad is p.grad else grad
                if wd != 0:
                    d.add_(y, alpha=wd)  # decay computed at y (schedulefree >= 1.3)
                schedule_free_update_(y, z, d, lr=lr, beta=beta, c=c)
                if y is not p:
                    p.copy_(y)
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

    Raises:
        ValueError: negative or non-finite ``lr``/``eps``/``weight_decay``/``r``/``weight_lr_power``,
            ``beta1`` outside (0, 1), ``beta2`` outside [0, 1), a negative or non-integer
            ``warmup_steps``.
        RuntimeError: ``step()`` in eval mode.

    Example:
        >>> opt = AdamWScheduleFree(model.parameters(), lr=2.5e-3, warmup_steps=100)
        >>> opt.eval()   # before validation or saving: the parameters become x
        >>> opt.train()  # before training steps again

    Matches ``schedulefree.AdamWScheduleFree`` 1.4.1. Paper: Defazio et al., "The Road Less
    Scheduled", arXiv:2405.15682.
    """

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
        super().__init__(params, defaults)

    def _beta(self, group: dict[str, Any]) -> float:
        return group["betas"][0]

    def _lr(self, group: dict[str, Any], k: int) -> float:
        warmup = group["warmup_steps"]
        return group["lr"] * ((k + 1) / warmup if k < warmup else 1.0)

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        super()._init_state(p, state)
        state["exp_avg_sq"] = torch.zeros_like(state["z"], memory_format=torch.preserve_format)

    def _direction(self, group: dict[str, Any], k: int, grad: Tensor, state: dict[str, Any]) -> Tensor:
        beta2 = group["betas"][1]
        return adam_direction(
            grad, state["exp_avg_sq"], beta2=beta2, bias_correction2=1.0 - beta2 ** (k + 1), eps=group["eps"]
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

    Raises:
        ValueError: as :class:`AdamWScheduleFree` (there is no ``warmup_steps``).
        RuntimeError: ``step()`` in eval mode.

    Example:
        >>> opt = RAdamScheduleFree(model.parameters(), lr=2.5e-3)

    Matches ``schedulefree.RAdamScheduleFree`` 1.4.1. Paper: arXiv:2405.15682; RAdam: Liu et al.,
    arXiv:1908.03265.
    """

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
        super().__init__(params, defaults)

    def _beta(self, group: dict[str, Any]) -> float:
        return group["betas"][0]

    def _lr(self, group: dict[str, Any], k: int) -> float:
        rect = radam_rectification(k + 1, group["betas"][1])
        if rect is None:
            rect = 0.0 if group["silent_sgd_phase"] else 1.0
        return group["lr"] * rect

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        super()._init_state(p, state)
        state["exp_avg_sq"] = torch.zeros_like(state["z"], memory_format=torch.preserve_format)

    def _direction(self, group: dict[str, Any], k: int, grad: Tensor, state: dict[str, Any]) -> Tensor:
        beta2 = group["betas"][1]
        bc2 = 1.0 - beta2 ** (k + 1)
        if radam_rectification(k + 1, beta2) is None:
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            return grad
        return adam_direction(grad, state["exp_avg_sq"], beta2=beta2, bias_correction2=bc2, eps=group["eps"])


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

    Raises:
        ValueError: ``momentum`` outside (0, 1), negative or non-finite numbers, a negative or
            non-integer ``warmup_steps``.
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
        super().__init__(params, defaults)

    def _beta(self, group: dict[str, Any]) -> float:
        return group["momentum"]

    def _lr(self, group: dict[str, Any], k: int) -> float:
        warmup = group["warmup_steps"]
        return group["lr"] * ((k + 1) / warmup if k < warmup else 1.0)

    def _direction(self, group: dict[str, Any], k: int, grad: Tensor, state: dict[str, Any]) -> Tensor:
        return grad


def _schedule_free_mode() -> Any:
    from lightning_opt.callbacks.schedule_free_mode import ScheduleFreeMode

    return ScheduleFreeMode()


_PAPER = "Defazio et al., The Road Less Scheduled, arXiv:2405.15682"
register(
    OptimInfo(
        name="schedule_free_adamw",
        cls=AdamWScheduleFree,
        default_lr=0.0025,
        description="Schedule-Free AdamW (no LR schedule; eval() holds the averaged weights)",
        paper=_PAPER,
        callbacks=(_schedule_free_mode,),
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
        callbacks=(_schedule_free_mode,),
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
        callbacks=(_schedule_free_mode,),
        schedule_free=True,
    )
)
# Hugging Face TrainingArguments.optim uses our names ("schedule_free_adamw", ...); nothing to alias
