"""LOMO: LOw-Memory Optimization, SGD fused into the backward pass (Lv et al. 2023, arXiv:2306.09782).

The update, per parameter, with math in float32 for bf16/fp16 parameters:

- ``g <- g / S`` with the loss scale ``S`` (only with loss scaling, see below)
- ``g <- clamp(g, -clip_grad_value, clip_grad_value)`` (when ``clip_grad_value`` is set)
- ``g <- g * min(1, clip_grad_norm / (||G|| + 1e-6))`` where ``||G||`` is the 2-norm of all the
  gradients together (when ``clip_grad_norm`` is set; measured before the value clamp)
- ``p <- p (1 - lr wd)``; ``p <- p - lr g``

LOMO's memory saving comes from :meth:`Lomo.fused_backward`: every parameter is updated inside the
backward pass as soon as its gradient exists and the gradient is freed at once, so only one gradient
is alive at a time (the hooks live in :mod:`lightning_opt.optim._fused`, shared with AdaLomo). The
global gradient norm is not known until the whole backward has run, so with ``clip_grad_norm``
``fused_backward`` runs the paper's two passes over the same graph: the first only measures the
norms (each gradient freed once measured), the second updates with the clipping coefficient.

Loss scaling (fp16): as ``lomo_optim``, dynamic loss scaling turns on when the first loss handed to
``fused_backward`` is float16 (``loss_scaling=None``; ``True``/``False`` force it). The loss is
multiplied by the scale, gradients are divided by it, and an inf/NaN gradient skips the step and
divides the scale by ``scale_factor``. Overflow must be seen before any parameter changes, so
loss scaling always runs the measuring pass (the reference forces ``clip_grad_norm=1.0`` for that;
here ``clip_grad_norm`` stays what you set). After ``scale_window`` clean steps the scale grows by
``scale_factor`` (the rule of the reference's ``DynamicLossScaler``, which its ``Lomo`` never
calls, so its scale only ever shrinks).

Under Lightning's automatic optimization the backward call belongs to Lightning, so :class:`Lomo`
also has an ordinary ``step()`` with the same math (``clip_grad_norm`` and ``clip_grad_value`` applied
there too): it works with gradient accumulation and GradScaler but holds all gradients at once.
For the memory saving use manual optimization and ``fused_backward`` instead of ``manual_backward``.

One implementation (``impl="for_loop"``, :func:`lomo_update_` per tensor): the fused backward
updates one tensor at a time; ``impl`` is accepted for a uniform configuration.

Registered as ``lomo`` (Hugging Face's ``optim="lomo"`` too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_opt.optim._fused import FusedBackward
from lightning_opt.optim.base import (
    backfill_group_defaults,
    check_arg,
    check_lr_wd,
    compute_dtype,
    is_int,
    is_number,
    reject_sparse_grad,
    run_closure,
)
from lightning_opt.optim.engine import Impl, check_impl, dispatch, is_dtensor
from lightning_opt.optim.precision import total_norm
from lightning_opt.optim.registry import OptimInfo, register

__all__ = ["LOMO_IMPLS", "Lomo", "clip_coefficient", "lomo", "lomo_update_"]


def lomo_update_(
    param: Tensor,
    grad: Tensor,
    *,
    lr: float,
    weight_decay: float,
    clip_coef: Tensor | None = None,
    clip_grad_value: float | None = None,
    loss_scale: float | None = None,
) -> None:
    """One LOMO (SGD) step for one tensor, in place on ``param``; ``grad`` is not modified.

    Args:
        param, grad: the parameter and its gradient (math in float32 for bf16/fp16).
        lr: learning rate. weight_decay: ``p *= 1 - lr * wd`` before the update.
        clip_coef: the global-norm clipping factor ``min(1, c / (||G|| + 1e-6))`` (a 0-dim tensor), or ``None``.
        clip_grad_value: clamp the gradient to ``[-v, v]`` (after unscaling), or ``None``.
        loss_scale: divide the gradient by it first, or ``None``.
    """
    dt = compute_dtype(param)
    g = grad.to(dt)
    if loss_scale is not None:
        g = g.div(loss_scale)
    if clip_grad_value is not None:
        g = g.clamp(min=-clip_grad_value, max=clip_grad_value)
    if clip_coef is not None:
        g = g.mul(clip_coef)
    p = param.to(dt)
    if weight_decay != 0:
        p.mul_(1.0 - lr * weight_decay)
    p.add_(g, alpha=-lr)
    if p is not param:
        param.copy_(p)


def clip_coefficient(norms: Sequence[Tensor], max_norm: float) -> Tensor:
    """``min(1, max_norm / (||norms||_2 + 1e-6))``: the factor of LOMO's (and torch's) norm clipping.

    ``norms`` are per-tensor 2-norms; their 2-norm is the norm of all the gradients together. Returned
    as a 0-dim tensor (no host sync), in float64 if any norm is, else float32.
    """
    dt = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    device = norms[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(device=device, dtype=dt) for n in norms]))
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)


def _grad_norm(p: Tensor, grad: Tensor, loss_scale: float | None) -> Tensor:
    g = grad.to(compute_dtype(p))
    if loss_scale is not None:
        g = g.div(loss_scale)  # unscale first, as the update does (same rounding as the reference)
    return torch.linalg.vector_norm(g)


def _lomo_for_loop(params: list[Tensor], grads: list[Tensor], **hp: Any) -> None:
    for p, g in zip(params, grads):
        lomo_update_(p, g, **hp)


#: LOMO's implementations, by ``impl`` name: the per-tensor reference only (module docstring: why)
LOMO_IMPLS = {"for_loop": _lomo_for_loop}


def lomo(
    params: list[Tensor],
    grads: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    clip_coef: Tensor | None = None,
    clip_grad_value: float | None = None,
    loss_scale: float | None = None,
    impl: str = "auto",
) -> None:
    """LOMO over tensor lists (the functional API): :func:`lomo_update_` for every tensor."""
    dispatch(
        "Lomo",
        "lomo",
        impl,
        LOMO_IMPLS,
        {"params": params, "grads": grads},
        lr=lr,
        weight_decay=weight_decay,
        clip_coef=clip_coef,
        clip_grad_value=clip_grad_value,
        loss_scale=loss_scale,
    )


def _check_clip_value(value: Any) -> None:
    check_arg(
        "Lomo",
        "clip_grad_value",
        value,
        value is None or (is_number(value) and value > 0),
        "it must be None (off) or a finite number > 0",
    )


class Lomo(FusedBackward, Optimizer):
    """LOMO: plain SGD whose update can run inside the backward pass (no optimizer state).

    A normal ``step()`` optimizer (works under Lightning's automatic optimization); for LOMO's
    memory saving call :meth:`fused_backward` in manual optimization (module docstring: why).

    Args:
        params: parameters or param-group dicts (extra keys such as ``param_names`` pass through).
        lr: learning rate (default ``1e-3``).
        weight_decay: ``p *= 1 - lr * wd`` before the update (default ``0.0``).
        clip_grad_norm: clip all gradients together to this 2-norm (``None``: off, the default).
            Optimizer-wide (the norm is over every group); two backward passes in ``fused_backward``.
        clip_grad_value: clamp each gradient element to ``[-v, v]`` (``None``: off); a group option.
        loss_scaling: dynamic loss scaling in ``fused_backward``: ``None`` (default) turns it on when
            the first loss is float16 (as ``lomo_optim``), ``True``/``False`` force it. Under autocast
            (``precision="16-mixed"``) the loss is usually float32: pass ``True`` for fp16 activations.
        init_scale: the first loss scale (default ``2**32``, the reference's).
        scale_factor: the scale is divided by it on overflow and multiplied after ``scale_window``
            clean steps (default ``2.0``). scale_window: default ``1000``.
        min_scale: the smallest scale; an overflow at it raises (default ``1.0``).
        impl: ``"auto"`` (default) or ``"for_loop"``, the single implementation. Keyword-only.

    Raises:
        ValueError: invalid lr, weight_decay, clipping or loss-scaling option, or impl.

    Example:
        >>> opt = build_optimizer(model, "lomo", lr=1e-3, clip_grad_norm=1.0)
        >>> # manual optimization, LOMO memory: opt.fused_backward(loss) replaces backward() + step()

    Matches ``lomo_optim.Lomo`` (lomo-optim 0.1.1, the authors' code; its ``grad_norm`` +
    ``fused_backward(loss, lr)`` is one ``fused_backward(loss)`` call here, and the lr is the
    group's, so schedulers work). Paper: Lv et al., "Full Parameter Fine-tuning for Large Language
    Models with Limited Resources", arXiv:2306.09782.
    """

    #: the ``impl`` values this class takes besides ``"auto"`` (the contract suite runs each)
    impls: ClassVar[tuple[str, ...]] = tuple(LOMO_IMPLS)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        loss_scaling: bool | None = None,
        init_scale: float = 2.0**32,
        scale_factor: float = 2.0,
        scale_window: int = 1000,
        min_scale: float = 1.0,
        impl: Impl = "auto",
    ) -> None:
        check_lr_wd("Lomo", lr, weight_decay)

        def check(key: str, value: Any, ok: bool, hint: str) -> None:
            check_arg("Lomo", key, value, ok, hint)

        check(
            "clip_grad_norm",
            clip_grad_norm,
            clip_grad_norm is None or (is_number(clip_grad_norm) and clip_grad_norm > 0),
            "it must be None (off) or a finite number > 0",
        )
        _check_clip_value(clip_grad_value)
        check("loss_scaling", loss_scaling, loss_scaling is None or isinstance(loss_scaling, bool), "expected None, True or False")
        check("init_scale", init_scale, is_number(init_scale) and init_scale > 0, "it must be a finite number > 0")
        check("scale_factor", scale_factor, is_number(scale_factor) and scale_factor > 1, "it must be a finite number > 1")
        check("scale_window", scale_window, is_int(scale_window) and scale_window >= 1, "it must be an int >= 1")
        check(
            "min_scale",
            min_scale,
            is_number(min_scale) and 0 < min_scale <= init_scale,
            f"it must be a finite number in (0, init_scale={init_scale!r}]",
        )
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "clip_grad_value": None if clip_grad_value is None else float(clip_grad_value),
            "impl": check_impl("Lomo", impl, tuple(LOMO_IMPLS)),
        }
        super().__init__(params, defaults)
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        self.loss_scaling = loss_scaling
        self._scaling_options = {
            "init_scale": float(init_scale),
            "scale_factor": float(scale_factor),
            "scale_window": scale_window,
            "min_scale": float(min_scale),
        }
        #: the dynamic loss scaler's state (in ``state_dict()["loss_scaler"]``); ``enabled`` is
        #: resolved by the first ``fused_backward`` when ``loss_scaling`` is ``None``
        self.loss_scaler: dict[str, Any] = {"enabled": loss_scaling, "scale": float(init_scale), "clean_steps": 0}
        self._init_fused()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; an invalid ``impl``, ``lr``, ``weight_decay`` or ``clip_grad_value`` is refused first."""
        if "impl" in param_group:
            check_impl("Lomo", param_group["impl"], tuple(LOMO_IMPLS))
        if "clip_grad_value" in param_group:
            _check_clip_value(param_group["clip_grad_value"])
        if hasattr(self, "defaults"):
            check_lr_wd(
                "Lomo",
                param_group.get("lr", self.defaults["lr"]),
                param_group.get("weight_decay", self.defaults["weight_decay"]),
            )
        super().add_param_group(param_group)

    @staticmethod
    def _run(params: list[Tensor], grads: list[Tensor], group: dict[str, Any], **extra: Any) -> None:
        lomo(
            params,
            grads,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            clip_grad_value=group["clip_grad_value"],
            impl=group["impl"],
            **extra,
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; ``closure`` (re-evaluating the loss) is called once, with grad enabled.

        Raises:
            RuntimeError: ``loss_scaling=True`` (loss scaling belongs to :meth:`fused_backward`;
                with ``step()`` use ``torch.amp.GradScaler`` or Lightning's ``precision="16-mixed"``).
        """
        if self.loss_scaler["enabled"]:
            raise RuntimeError(
                "Lomo(loss_scaling=True) scales the loss inside fused_backward; step() takes the gradients of "
                "your own backward(). Use torch.amp.GradScaler (Lightning: precision='16-mixed') with step(), "
                "or fused_backward(loss)."
            )
        loss = run_closure(closure)
        per_group = [[p for p in g["params"] if p.grad is not None] for g in self.param_groups]
        for params in per_group:  # all checked before any parameter changes
            for p in params:
                reject_sparse_grad(p, "Lomo")
        coef = None
        if self.clip_grad_norm is not None and any(per_group):
            grads = [p.grad for ps in per_group for p in ps]
            if any(is_dtensor(g) for g in grads):  # FSDP2 shards: local sums, one all-reduce
                coef = clip_coefficient([total_norm("Lomo", grads)], self.clip_grad_norm)
            else:
                coef = clip_coefficient([_grad_norm(p, p.grad, None) for ps in per_group for p in ps], self.clip_grad_norm)
        for group, params in zip(self.param_groups, per_group):
            self._run(params, [p.grad for p in params], group, clip_coef=coef)
        return loss

    def fused_backward(self, loss: Tensor) -> bool:
        """Backward pass that updates each parameter as soon as its gradient is ready (LOMO).

        Replaces ``loss.backward(); opt.step(); opt.zero_grad()`` in manual optimization; gradients
        are freed as they are consumed. With ``clip_grad_norm`` or loss scaling it runs two backward
        passes over the graph (the first measures the gradient norm and finds overflows). The group
        ``lr`` is read as usual (schedulers work). Not compatible with gradient accumulation,
        Lightning's gradient clipping or GradScaler; leave ``p.grad`` empty before calling it.

        Returns:
            ``True`` if the parameters were updated, ``False`` if loss scaling found an overflow and
            skipped the step (the scale was reduced).

        Raises:
            RuntimeError: some parameter already holds a gradient; or an overflow at ``min_scale``.
        """
        scaler = self.loss_scaler
        if scaler["enabled"] is None:
            scaler["enabled"] = loss.dtype == torch.float16  # decided by the first loss, as lomo_optim
        scale = scaler["scale"] if scaler["enabled"] else None
        if scale is not None:
            loss = loss * scale
        coef = None
        if self.clip_grad_norm is not None or scale is not None:
            norms: list[Tensor] = []
            self._fused_pass(loss, lambda p, group: norms.append(_grad_norm(p, p.grad, scale)), retain_graph=True)
            if norms and scale is not None:
                total = torch.linalg.vector_norm(torch.stack([n.float().to(norms[0].device) for n in norms]))
                if not bool(torch.isfinite(total)):  # one host sync per step, only with loss scaling
                    self._overflow()
                    return False
            if norms and self.clip_grad_norm is not None:
                coef = clip_coefficient(norms, self.clip_grad_norm)
        self._fused_pass(loss, lambda p, group: self._run([p], [p.grad], group, clip_coef=coef, loss_scale=scale))
        if scale is not None:
            scaler["clean_steps"] += 1
            if scaler["clean_steps"] >= self._scaling_options["scale_window"]:
                scaler["scale"] *= self._scaling_options["scale_factor"]
                scaler["clean_steps"] = 0
        return True

    def _overflow(self) -> None:
        scaler, opts = self.loss_scaler, self._scaling_options
        if scaler["scale"] <= opts["min_scale"]:
            raise RuntimeError(
                f"Lomo: the gradients overflow at the minimum loss scale {opts['min_scale']:g}; the loss itself is "
                "inf/NaN or too large for float16. Lower the lr, clip the gradients, or train in bf16/float32."
            )
        scaler["scale"] = max(scaler["scale"] / opts["scale_factor"], opts["min_scale"])
        scaler["clean_steps"] = 0

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus ``"loss_scaler"`` (the dynamic loss scale and its clean-step count)."""
        return {**super().state_dict(), "loss_scaler": dict(self.loss_scaler)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load torch's state dict and the loss scaler's state (absent in old checkpoints: kept as is)."""
        state_dict = dict(state_dict)
        scaler = state_dict.pop("loss_scaler", None)
        super().load_state_dict(state_dict)
        if scaler is not None:
            self.loss_scaler = dict(scaler)

    def __getstate__(self) -> dict[str, Any]:
        # torch pickles only defaults, state and param_groups; the optimizer-wide options go along
        keys = ("clip_grad_norm", "loss_scaling", "_scaling_options", "loss_scaler")
        return {**super().__getstate__(), **{k: self.__dict__[k] for k in keys}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        backfill_group_defaults(self, impl="auto", clip_grad_value=None)
        self._restore_fused()


register(
    OptimInfo(
        name="lomo",
        cls=Lomo,
        description="LOMO: SGD fused into the backward pass (step(); fused_backward for LOMO memory), norm clipping",
        paper="Lv et al., arXiv:2306.09782",
        default_lr=1e-3,
    )
)
