"""AdaLomo: LOMO with an adaptive, factored learning rate (Lv et al. 2023, arXiv:2310.10195).

The update (no momentum, Adafactor-like factored second moment, grouped update normalization):

- ``beta2_t = 1 - t^decay_rate`` (``decay_rate=-0.8``; ``beta2_1 = 0`` so ``v = g^2`` at step 1)
- for ``ndim >= 2``: ``r <- beta2_t r + (1 - beta2_t) rowmean(g^2 + eps1)``,
  ``c <- beta2_t c + (1 - beta2_t) colmean(g^2 + eps1)`` (factored over the last two dims),
  ``u = g / sqrt(r c / mean(r))``; for vectors ``v <- beta2_t v + (1 - beta2_t)(g^2 + eps1)``, ``u = g / sqrt(v)``
- grouped update normalization: ``u <- u / max(1, RMS(u) / clip_threshold)`` per tensor
- ``lr_t = lr * max(eps2, RMS(p))``; ``p <- p (1 - lr_t wd)``; ``p <- p - lr_t u``

Why a plain ``step()``: LOMO's memory saving comes from updating each parameter inside the
backward pass, as soon as its gradient exists, and freeing the gradient at once (``fused_backward``
replaces ``backward()`` + ``step()``). Lightning's automatic optimization owns the backward call and
runs ``step()`` after it (and gradient accumulation, clipping and GradScaler need the gradients to
survive until then), so the fused form cannot run there. :class:`AdaLomo` therefore has an ordinary
``step()`` with the same math: it works under automatic optimization, with gradient accumulation,
clipping and AMP, but holds all gradients at once like any optimizer. For the memory saving use
manual optimization and :meth:`AdaLomo.fused_backward` instead of ``self.manual_backward``.

One implementation (``impl="for_loop"``, :func:`adalomo_update_` per tensor; :func:`adalomo` is the
list-level API): every statistic is per tensor (the row and column means of its own ``g^2``, its
update RMS, its parameter RMS) and the fused backward updates one tensor at a time, so a
multi-tensor ``foreach`` form would batch only the cheap elementwise ops around them. ``impl`` is
accepted for a uniform configuration.

Registered as ``adalomo`` (Hugging Face's name too).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_opt.optim._fused import FusedBackward
from lightning_opt.optim.base import (
    OptionCheck,
    backfill_group_defaults,
    check_param_group,
    compute_dtype,
    keep_state_dtype_on_load,
    number_in,
    reject_sparse_grad,
    run_closure,
)
from lightning_opt.optim.distributed import check_shardable, local
from lightning_opt.optim.engine import Impl, check_impl, dispatch, is_dtensor
from lightning_opt.optim.layout import guard_param_layout
from lightning_opt.optim.precision import run_reduction_rounds
from lightning_opt.optim.registry import OptimInfo, register

__all__ = ["ADALOMO_IMPLS", "AdaLomo", "adalomo", "adalomo_sharded_", "adalomo_update_"]


def _rms(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t) / math.sqrt(t.numel())


def adalomo_update_(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    *,
    step: int,
    lr: float,
    eps1: float,
    eps2: float,
    clip_threshold: float,
    decay_rate: float,
    weight_decay: float,
) -> None:
    """One AdaLomo step for one tensor, in place on ``param`` and the second-moment tensors.

    Args:
        param, grad: the parameter and its gradient (math in float32 for bf16/fp16).
        state: ``exp_avg_sq_row`` (``shape[:-1]``) and ``exp_avg_sq_col`` (``shape[:-2] + shape[-1:]``)
            for ``param.ndim >= 2``, else ``exp_avg_sq`` (``shape``); updated in place.
        step: the 1-based step ``t``.
        lr: base learning rate (scaled by ``max(eps2, RMS(p))``).
        eps1: added to ``g^2`` (``1e-30``). eps2: floor of the parameter RMS (``1e-3``).
        clip_threshold: RMS bound of the normalized update (``1.0``).
        decay_rate: ``beta2_t = 1 - t^decay_rate`` (``-0.8``).
        weight_decay: ``p *= 1 - lr_t * wd``, before the update.
    """
    dt = compute_dtype(param)
    g = grad.to(dt)
    beta2t = 1.0 - math.pow(step, decay_rate)
    sq = g.square().add_(eps1)
    if g.ndim >= 2:
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1.0 - beta2t)
        col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=1.0 - beta2t)
        r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        c_factor = col.unsqueeze(-2).rsqrt()
        update = (r_factor * c_factor).mul_(g)
    else:
        v = state["exp_avg_sq"]
        v.mul_(beta2t).add_(sq, alpha=1.0 - beta2t)
        update = v.rsqrt().mul_(g)
    update.div_((_rms(update) / clip_threshold).clamp_(min=1.0))
    p = param.to(dt)
    lr_t = torch.clamp(_rms(p), min=eps2) * lr  # a 0-dim tensor: no host sync
    if weight_decay != 0:
        p.mul_(1.0 - lr_t * weight_decay)
    p.sub_(update.mul_(lr_t))
    if p is not param:
        param.copy_(p)


def _adalomo_for_loop(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], **hp: Any) -> None:
    for p, g, state in zip(params, grads, states):
        adalomo_update_(p, g, state, step=state["step"], **hp)


#: AdaLomo's implementations, by ``impl`` name: the per-tensor reference only (module docstring: why)
ADALOMO_IMPLS = {"for_loop": _adalomo_for_loop}


def adalomo(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    *,
    lr: float,
    eps1: float,
    eps2: float,
    clip_threshold: float,
    decay_rate: float,
    weight_decay: float,
    impl: str = "auto",
) -> None:
    """AdaLomo over tensor lists (the functional API): :func:`adalomo_update_` for every tensor.

    ``states`` hold each tensor's second-moment tensors and its ``step``, already incremented.
    ``impl``: ``"auto"`` or ``"for_loop"``, the single implementation (module docstring: why).
    """
    dispatch(
        "AdaLomo",
        "adalomo",
        impl,
        ADALOMO_IMPLS,
        {"params": params, "grads": grads, "states": states},
        lr=lr,
        eps1=eps1,
        eps2=eps2,
        clip_threshold=clip_threshold,
        decay_rate=decay_rate,
        weight_decay=weight_decay,
    )


def _sharded_zeros(p: Tensor, shape: torch.Size, dtype: torch.dtype, replicate: bool) -> Tensor:
    """Zeros of global ``shape`` for a statistic of the FSDP2 shard ``p``: a DTensor on ``p``'s mesh,
    ``Shard(0)`` (its dim 0 is ``p``'s) or, with ``replicate``, ``Replicate()`` (reduced over ``p``'s rows)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    lp = local(p)
    if replicate:
        zeros, placement = torch.zeros(shape, dtype=dtype, device=lp.device), Replicate()
    else:
        zeros, placement = torch.zeros((lp.size(0), *shape[1:]), dtype=dtype, device=lp.device), Shard(0)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(zeros, p.device_mesh, [placement], run_check=False, shape=shape, stride=stride)


def adalomo_sharded_(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], groups: list[dict[str, Any]]
) -> None:
    """AdaLomo on FSDP2 shards: local statistics plus two coalesced all-reduces per step.

    The math is Adafactor's factored step with AdaLomo's options (``eps1`` added to ``g^2``,
    ``beta2_t = 1 - t^decay_rate``, no momentum, ``lr_t = lr max(eps2, RMS(p))`` also scaling the
    decay), run by :func:`lightning_opt.optim.adafactor.adafactor_rounds`: row statistics stay with
    the rows, column statistics, ``mean(r)``, ``RMS(p)`` and ``RMS(u)`` are partial sums completed
    by all-reduces coalesced over every tensor (one round for the statistics and ``RMS(p)``, one
    for ``RMS(u)``). Equal to :func:`adalomo_update_` up to the order of summation. ``states``
    hold AdaLomo's own keys (``exp_avg_sq_row``: ``shape[:-1]``, ``exp_avg_sq_col``; 1-D:
    ``exp_avg_sq``), viewed here in Adafactor's keep-dim layout; ``groups``: each tensor's group.
    """
    from lightning_opt.optim.adafactor import adafactor_rounds

    gens = []
    for p, g, state, group in zip(params, grads, states, groups):
        eps1, eps2 = group["eps"]
        nd = p.ndim
        row = local(state["exp_avg_sq_row"]).unsqueeze(-1) if nd >= 2 else None
        col = local(state["exp_avg_sq_col"]).unsqueeze(-2) if nd >= 2 else None
        var = local(state["exp_avg_sq"]) if nd < 2 else None
        gens.append(
            adafactor_rounds(
                [p], [g], [row], [col], [var], [None], [state["step"]], impl="for_loop", cls="AdaLomo",
                lr=group["lr"], beta1=None, beta2=None, decay_rate=group["decay_rate"], eps1=eps1, eps2=eps2,
                clip_threshold=group["clip_threshold"], relative_step=False, scale_parameter=True,
                warmup_init=False, weight_decay=group["weight_decay"], weight_decay_mode="step_size",
                eps1_mode="add", maximize=False,
            )
        )
    run_reduction_rounds(gens)


class AdaLomo(FusedBackward, Optimizer):
    """AdaLomo: factored adaptive learning rate with grouped update normalization, no momentum.

    A normal ``step()`` optimizer (works under Lightning's automatic optimization); for LOMO's fused
    backward-and-update use :meth:`fused_backward` in manual optimization (module docstring: why).

    Args:
        params: parameters or param-group dicts (extra keys such as ``param_names`` pass through).
        lr: learning rate, scaled per tensor by ``max(eps[1], RMS(p))`` (default ``1e-3``).
        eps: ``(eps1, eps2)``: added to ``g^2``, and the floor of the parameter RMS (default
            ``(1e-30, 1e-3)``).
        clip_threshold: the normalized update's RMS bound (default ``1.0``).
        decay_rate: exponent of ``beta2_t = 1 - t^decay_rate``, in [-1, 0) (default ``-0.8``).
        weight_decay: ``p *= 1 - lr_t * wd`` with the scaled ``lr_t`` (default ``0.0``).
        impl: ``"auto"`` (default) or ``"for_loop"``: the single implementation; ``impl`` is
            accepted for a uniform configuration (module docstring: why there is no ``foreach``).
            Keyword-only; it applies to :meth:`step` and :meth:`fused_backward` alike.

    Raises:
        ValueError: invalid lr, eps, clip_threshold, decay_rate, weight_decay or impl.
        NotImplementedError: a DTensor that is not FSDP2's ``Shard(0)`` on a 1-D mesh.

    On FSDP2 shards (``fully_shard``) :meth:`step` runs :func:`adalomo_sharded_`: every statistic is
    computed on the local rows and completed by two coalesced all-reduces per step (no gather); the
    row statistics (and 3-D tensors' column statistics) are DTensors sharded like the parameter, a
    2-D tensor's column statistics a replicated DTensor, so ``torch.distributed.checkpoint`` saves
    and reshards them. Under DDP every rank steps its identical replica (the work is elementwise).
    :meth:`fused_backward` refuses shards.

    Example:
        >>> opt = build_optimizer(model, "adalomo", lr=1e-3)
        >>> # manual optimization, LOMO memory: opt.fused_backward(loss) replaces backward() + step()

    Matches ``lomo_optim.AdaLomo`` (lomo-optim 0.1.1, the authors' code) without its loss scaling
    and gradient clipping (use GradScaler / Lightning's ``gradient_clip_val`` with ``step()``), and
    with state in ``optimizer.state`` (the reference keeps it in dicts outside, so it cannot resume).
    The reference factors only the first two dims of a tensor; tensors with more dims are factored
    over the last two here, as Adafactor does. Paper: Lv et al., "AdaLomo: Low-memory Optimization
    with Adaptive Learning Rate", arXiv:2310.10195.
    """

    #: the ``impl`` values this class takes besides ``"auto"`` (the contract suite runs each)
    impls: ClassVar[tuple[str, ...]] = tuple(ADALOMO_IMPLS)
    #: factored moments and the update norm have no complex form here (base.reject_complex)
    supports_complex: ClassVar[bool] = False
    #: group options with their own checks (base.check_options: the constructor's and each group's)
    option_checks: ClassVar[dict[str, OptionCheck]] = {
        "clip_threshold": number_in(lambda x: x > 0, "it must be a finite number > 0 (the update RMS bound)"),
        "decay_rate": number_in(lambda x: -1 <= x < 0, "it must lie in [-1, 0) (beta2_t = 1 - t^decay_rate)"),
    }

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        weight_decay: float = 0.0,
        *,
        impl: Impl = "auto",
    ) -> None:
        def number(v: Any) -> bool:
            return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)

        def check(key: str, value: Any, ok: bool, hint: str) -> None:
            if not ok:
                raise ValueError(f"AdaLomo({key}={value!r}) is invalid; {hint}")

        check("lr", lr, number(lr) and lr >= 0, "lr must be a finite number >= 0")
        check(
            "eps",
            eps,
            isinstance(eps, (tuple, list)) and len(eps) == 2 and all(number(e) and e >= 0 for e in eps),
            "expected (eps1, eps2), two finite numbers >= 0",
        )
        check(
            "clip_threshold",
            clip_threshold,
            number(clip_threshold) and clip_threshold > 0,
            "it must be a finite number > 0 (the update RMS bound)",
        )
        check(
            "decay_rate",
            decay_rate,
            number(decay_rate) and -1 <= decay_rate < 0,
            "it must lie in [-1, 0) (beta2_t = 1 - t^decay_rate)",
        )
        check(
            "weight_decay", weight_decay, number(weight_decay) and weight_decay >= 0, "it must be a finite number >= 0"
        )
        defaults = {
            "lr": lr,
            "eps": (float(eps[0]), float(eps[1])),
            "clip_threshold": float(clip_threshold),
            "decay_rate": float(decay_rate),
            "weight_decay": weight_decay,
            "impl": check_impl("AdaLomo", impl, tuple(ADALOMO_IMPLS)),
        }
        super().__init__(params, defaults)
        guard_param_layout(self, type(self).__name__, "factors each matrix's second moment by rows and columns")
        keep_state_dtype_on_load(self)
        self._init_fused()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its own options are checked as the constructor's, before it is added."""
        super().add_param_group(check_param_group(self, param_group))
        group = self.param_groups[-1]
        names = group.get("param_names") or [None] * len(group["params"])
        for p, name in zip(group["params"], names):
            check_shardable("AdaLomo", p, name)

    def _prepare(self, p: Tensor) -> dict[str, Any]:
        """``p``'s state, created on first use, with its step incremented for this update."""
        state = self.state[p]
        dt = compute_dtype(p)
        if "step" not in state:
            state["step"] = 0
            if is_dtensor(p):  # sharded like p; a 2-D tensor's column statistics are whole (replicated)
                if p.ndim >= 2:
                    state["exp_avg_sq_row"] = _sharded_zeros(p, p.shape[:-1], dt, False)
                    state["exp_avg_sq_col"] = _sharded_zeros(p, p.shape[:-2] + p.shape[-1:], dt, p.ndim == 2)
                else:
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=dt)
            elif p.ndim >= 2:
                state["exp_avg_sq_row"] = torch.zeros(p.shape[:-1], dtype=dt, device=p.device)
                state["exp_avg_sq_col"] = torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=dt, device=p.device)
            else:
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=dt)
        state["step"] += 1
        return state

    @staticmethod
    def _run(params: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any]) -> None:
        eps1, eps2 = group["eps"]
        adalomo(
            params,
            [p.grad for p in params],
            states,
            lr=group["lr"],
            eps1=eps1,
            eps2=eps2,
            clip_threshold=group["clip_threshold"],
            decay_rate=group["decay_rate"],
            weight_decay=group["weight_decay"],
            impl=group["impl"],
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; ``closure`` (re-evaluating the loss) is called once, with grad enabled."""
        loss = run_closure(closure)
        shards: list[tuple[Tensor, dict[str, Any]]] = []  # FSDP2 shards of every group, reduced together
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:  # all checked before any state changes
                reject_sparse_grad(p, "AdaLomo")
            shards += [(p, group) for p in params if is_dtensor(p)]
            params = [p for p in params if not is_dtensor(p)]
            self._run(params, [self._prepare(p) for p in params], group)
        if shards:
            adalomo_sharded_(
                [p for p, _ in shards],
                [p.grad for p, _ in shards],
                [self._prepare(p) for p, _ in shards],
                [g for _, g in shards],
            )
        return loss

    def fused_backward(self, loss: Tensor) -> None:
        """Backward pass that updates each parameter as soon as its gradient is ready (LOMO).

        Replaces ``loss.backward(); opt.step(); opt.zero_grad()`` in manual optimization: every
        parameter's gradient is consumed by the AdaLomo update inside the backward pass and freed, so
        only one gradient is alive at a time. The group ``lr`` is read as usual (schedulers work).
        Not compatible with gradient accumulation, gradient clipping or GradScaler (the gradients
        never coexist); leave ``p.grad`` empty before calling it.

        Example:
            >>> def training_step(self, batch, idx):  # self.automatic_optimization = False
            ...     self.optimizers().optimizer.fused_backward(self.loss(batch))

        Raises:
            RuntimeError: some parameter already holds a gradient (accumulation is not supported).
            NotImplementedError: FSDP2 (DTensor) parameters: their statistics need all-reduces that a
                per-parameter backward hook would issue once per tensor; use ``step()``.
        """
        if any(is_dtensor(p) for g in self.param_groups for p in g["params"]):
            raise NotImplementedError(
                "AdaLomo.fused_backward does not run on FSDP2 (DTensor) parameters: their statistics are "
                "completed by all-reduces coalesced over the whole step; use loss.backward() + step()"
            )
        self._fused_pass(loss, lambda p, group: self._run([p], [self._prepare(p)], group))

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        backfill_group_defaults(self, impl="auto")
        self._restore_fused()


register(
    OptimInfo(
        name="adalomo",
        cls=AdaLomo,
        description=(
            "AdaLomo: factored adaptive lr with grouped update normalization (step(); fused_backward for LOMO memory)"
        ),
        paper="Lv et al., arXiv:2310.10195",
        default_lr=1e-3,
    )
)
