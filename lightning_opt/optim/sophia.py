"""Sophia: clipped, diagonally preconditioned sign-momentum (Liu et al. 2023, arXiv:2305.14342).

Registered as ``sophia`` (SophiaG, the Gauss-Newton-Bartlett Hessian estimator; DeepSpeed's
``SophiaOptimizer`` resolves to it) and ``sophia_h`` (SophiaH, Hutchinson's estimator).

The update (Algorithm 3 of the paper, and the official ``Liuhong99/Sophia`` code) per coordinate::

    p <- p (1 - lr wd)                              # decoupled weight decay
    m <- beta1 m + (1 - beta1) g
    p <- p - lr clip(m / max(scale h, eps), 1)       # clip(x, 1) = sign(x) min(|x|, 1)

with ``scale = rho * bs`` for SophiaG (``bs``: tokens per optimizer step, the ``B`` of the GNB
estimator ``B g_hat * g_hat``, kept out of ``h`` as in the official code) and ``scale = rho`` for
SophiaH. ``h`` is an EMA ``h <- beta2 h + (1 - beta2) h_hat`` refreshed every ``k`` steps by
:meth:`SophiaG.update_hessian` / :meth:`SophiaH.update_hessian`; in a Lightning ``Trainer`` the
callback :class:`lightning_opt.callbacks.SophiaHessian` does that (``OptimizerMixin`` adds it). Until
the first refresh ``h = 0`` and every step is a sign-momentum step of size ``lr``.

Estimators (plain functions here, used by the callback):

- GNB (:func:`gnb_estimate`): ``h_hat = g_hat * g_hat``, where ``g_hat`` is the gradient of the
  mean cross-entropy against labels *sampled from the model's own softmax* (not the data labels).
- Hutchinson (:func:`hutchinson_estimate`): ``h_hat = u * (H u)`` with ``u ~ N(0, I)`` (or
  Rademacher), ``H u`` a Hessian-vector product.

Differences from the references (documented, tested with matching options):

- The official SophiaG code divides by ``rho * bs * h + 1e-15``; the paper (and this file) by
  ``max(rho * bs * h, eps)``. They agree for ``h >= 0`` up to ``eps`` (``1e-15`` default).
  ``max`` matters for Hutchinson, whose ``h`` can be negative: ``+ eps`` would flip the step.
- ``pytorch_optimizer.SophiaH`` computes ``lr' * clamp(m / max(h, eps'), -p, p)``; that is ours
  with ``lr = lr' * p``, ``rho = p``, ``eps = p * eps'`` and ``weight_decay = wd' / p``.
- bf16/fp16 parameters keep float32 ``exp_avg``/``hessian`` and the math runs in float32;
  ``kahan_sum=True`` adds a Kahan compensation buffer so their small steps are not rounded away.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_opt.optim.base import (
    OptionCheck,
    as_option_check,
    backfill_group_defaults,
    check_param_group,
    check_rounding,
    compute_dtype,
    ensure_kahan_comp,
    keep_state_dtype_on_load,
    params_with_grad,
    run_closure,
)
from lightning_opt.optim.engine import Impl, check_impl, dispatch
from lightning_opt.optim.precision import LOW_PRECISION, apply_update_, apply_updates_, sr_keys
from lightning_opt.optim.registry import OptimInfo, register, register_alias

__all__ = [
    "SOPHIA_IMPLS",
    "SophiaG",
    "SophiaH",
    "gnb_estimate",
    "hessian_ema_",
    "hutchinson_estimate",
    "sophia",
    "sophia_update_",
]


# --------------------------------------------------------------------------------------------------
# the math, as plain functions of tensors


def sophia_update_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    hessian: Tensor,
    *,
    lr: float,
    beta1: float,
    scale: float,
    eps: float,
    weight_decay: float,
    kahan_comp: Tensor | None = None,
    stochastic: bool = False,
    seed: int = 0,
) -> None:
    """One Sophia step for one tensor, in place on ``param`` and ``exp_avg`` (the reference).

    ``p <- p (1 - lr wd)``; ``m <- beta1 m + (1 - beta1) g``;
    ``p <- p - lr sign(m) min(|m| / max(scale h, eps), 1)``. The math runs in ``exp_avg``'s dtype
    (float32 for bf16/fp16 parameters) and the step is rounded into ``param`` once; with
    ``kahan_comp`` (a buffer in ``param``'s dtype) it is Kahan-compensated, so steps below a bf16
    parameter's resolution accumulate instead of vanishing; with ``stochastic`` a bf16 parameter is
    stochastically rounded with bits seeded by ``seed`` (its step count, see ``precision``).
    """
    if weight_decay != 0:
        # outside the compensation, as torch-optimi and the Lion family here
        param.mul_(1.0 - lr * weight_decay)
    exp_avg.mul_(beta1).add_(grad.to(exp_avg.dtype), alpha=1.0 - beta1)
    denom = (hessian * scale).clamp_(min=eps)
    ratio = exp_avg.abs().div_(denom).clamp_(max=1.0)
    apply_update_(param, ratio.mul_(exp_avg.sign()).mul_(-lr), kahan_comp, stochastic=stochastic, seed=seed)


def _sophia_for_loop(params, grads, exp_avgs, hessians, kahan_comps, steps, **hp: Any) -> None:
    for p, g, m, h, c, s in zip(params, grads, exp_avgs, hessians, kahan_comps, steps):
        sophia_update_(p, g, m, h, kahan_comp=c, seed=s, **hp)


def _decay_(params: list[Tensor], factor: float) -> None:
    """``p.mul_(factor)`` for every tensor, rounded as the per-tensor op rounds."""
    if params[0].dtype in LOW_PRECISION:
        # torch's CPU foreach ops round a scalar to bf16/fp16 first (0.998 -> 0.99609375): multiply
        # in float32 and round once, as param.mul_ does
        wide = [p.float() for p in params]
        torch._foreach_mul_(wide, factor)
        torch._foreach_copy_(params, wide)
    else:
        torch._foreach_mul_(params, factor)


def _sophia_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    kahan_comps: list[Tensor | None],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    scale: float,
    eps: float,
    weight_decay: float,
    stochastic: bool = False,
) -> None:
    if weight_decay != 0:
        _decay_(params, 1.0 - lr * weight_decay)
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, [g.to(m.dtype) for g, m in zip(grads, exp_avgs)], alpha=1.0 - beta1)
    denom = torch._foreach_mul(hessians, scale)
    torch._foreach_clamp_min_(denom, eps)
    ratio = torch._foreach_abs(exp_avgs)
    torch._foreach_div_(ratio, denom)
    torch._foreach_clamp_max_(ratio, 1.0)
    torch._foreach_mul_(ratio, torch._foreach_sign(exp_avgs))
    torch._foreach_mul_(ratio, -lr)
    apply_updates_(params, ratio, kahan_comps, stochastic=stochastic, seeds=steps)


def _sophia_fused(
    params, grads, exp_avgs, hessians, kahan_comps, steps, *, lr, beta1, scale, eps, weight_decay, stochastic=False
) -> None:
    from lightning_opt.kernels import cpu

    # one launch per state dtype (float32 state for bf16/fp16 parameters; a checkpoint may differ)
    by_state: dict[torch.dtype, list[int]] = {}
    for i, (p, g, m, h) in enumerate(zip(params, grads, exp_avgs, hessians)):
        if g.dtype != p.dtype or h.dtype != m.dtype:
            raise TypeError(
                f"Sophia(impl='fused') needs gradients in the parameters' dtype and the Hessian in exp_avg's, got "
                f"{g.dtype}/{h.dtype} for a {p.dtype} parameter with {m.dtype} state; use impl='for_loop'"
            )
        by_state.setdefault(m.dtype, []).append(i)
    for state_dtype, idx in by_state.items():
        cpu.launch(
            "sophia",
            "sophia",
            [[lst[i] for i in idx] for lst in (params, grads, exp_avgs, hessians, kahan_comps)],
            [lr, beta1, scale, eps, weight_decay],
            # the switch, then (with it) each tensor's seed key (csrc/sophia.c)
            [int(stochastic), *sr_keys(stochastic, [steps[i] for i in idx], len(idx))],
            state_dtype=state_dtype,
        )


def _sophia_triton(*args: Any, **hp: Any) -> None:
    from lightning_opt.kernels.triton_sophia import sophia_triton_

    sophia_triton_(*args, **hp)


#: Sophia's step implementations, by ``impl`` name (``for_loop`` is the reference)
SOPHIA_IMPLS: dict[str, Callable[..., Any]] = {
    "for_loop": _sophia_for_loop,
    "foreach": _sophia_foreach,
    "fused": _sophia_fused,
    "triton": _sophia_triton,
}


def sophia(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    kahan_comps: list[Tensor | None],
    *,
    lr: float,
    beta1: float,
    scale: float,
    eps: float,
    weight_decay: float,
    stochastic: bool = False,
    steps: list[int] | None = None,
    impl: str = "auto",
    name: str = "Sophia",
) -> None:
    """Sophia's step over tensor lists (the functional API): :func:`sophia_update_` per tensor, by ``impl``.

    ``steps``: each tensor's step count, the seed of its stochastic rounding (``None``: 0 for all);
    ``name`` is the optimizer named in errors (``"SophiaG"``, ``"SophiaH"``).
    """
    dispatch(
        name,
        "sophia",
        impl,
        SOPHIA_IMPLS,
        {
            "params": params,
            "grads": grads,
            "exp_avgs": exp_avgs,
            "hessians": hessians,
            "kahan_comps": kahan_comps,
            "steps": [0] * len(params) if steps is None else steps,
        },
        lr=lr,
        beta1=beta1,
        scale=scale,
        eps=eps,
        weight_decay=weight_decay,
        stochastic=stochastic,
    )


def hessian_ema_(hessian: Tensor, estimate: Tensor, *, beta2: float) -> None:
    """``h <- beta2 h + (1 - beta2) h_hat``, in place."""
    hessian.mul_(beta2).add_(estimate.to(hessian.dtype), alpha=1.0 - beta2)


def gnb_estimate(grads: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Gauss-Newton-Bartlett estimates ``g_hat * g_hat`` from sampled-label gradients ``g_hat``.

    ``g_hat`` must be the gradient of the mean cross-entropy of the model's logits against labels
    drawn from ``softmax(logits)``; the batch-size factor ``B`` of the paper is the optimizer's ``bs``.
    """
    return [None if g is None else g * g for g in grads]


def hutchinson_estimate(
    loss: Tensor,
    params: Sequence[Tensor],
    *,
    num_samples: int = 1,
    distribution: str = "gaussian",
    generator: torch.Generator | None = None,
) -> list[Tensor | None]:
    """Hutchinson's diagonal-Hessian estimates ``mean_s u_s * (H u_s)`` for each of ``params``.

    Args:
        loss: a scalar whose graph reaches ``params`` (computed with grad enabled).
        params: the tensors to estimate for; those the loss does not depend on get ``None``.
        num_samples: probe vectors averaged (default ``1``).
        distribution: ``"gaussian"`` (``u ~ N(0, I)``, the paper's) or ``"rademacher"`` (``+-1``).
        generator: a generator on the parameters' device for the probes (reproducible without
            touching the global RNG); ``None`` uses the global RNG.

    Raises:
        ValueError: unknown ``distribution`` or ``num_samples < 1``.
    """
    if distribution not in ("gaussian", "rademacher"):
        raise ValueError(
            f"hutchinson_estimate(distribution={distribution!r}) is invalid; expected 'gaussian' or 'rademacher'"
        )
    if num_samples < 1:
        raise ValueError(f"hutchinson_estimate(num_samples={num_samples!r}) is invalid; it must be >= 1")
    params = list(params)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    out: list[Tensor | None] = [None] * len(params)
    for s in range(num_samples):
        probes = []
        for i in live:
            shape, dev, dt = params[i].shape, params[i].device, grads[i].dtype
            if distribution == "gaussian":
                u = torch.randn(shape, generator=generator, device=dev, dtype=dt)
            else:
                u = torch.randint(0, 2, shape, generator=generator, device=dev, dtype=dt).mul_(2).sub_(1)
            probes.append(u)
        hvps = torch.autograd.grad(
            [grads[i] for i in live],
            [params[i] for i in live],
            grad_outputs=probes,
            retain_graph=s < num_samples - 1,
            allow_unused=True,
        )
        for i, u, hu in zip(live, probes, hvps):
            est = u * hu if hu is not None else torch.zeros_like(u)
            out[i] = est if out[i] is None else out[i].add_(est)
    if num_samples > 1:
        out = [None if e is None else e.div_(num_samples) for e in out]
    return out


# --------------------------------------------------------------------------------------------------
# the optimizers


def _check(cls: str, key: str, value: Any, *, positive: bool = False) -> None:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and (value > 0 if positive else value >= 0)
    )
    if not ok:
        raise ValueError(
            f"{cls}({key}={value!r}) is invalid; it must be a finite number {'> 0' if positive else '>= 0'}"
        )


def _check_betas(cls: str, betas: Any) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{cls}(betas={betas!r}) is invalid; expected (beta1, beta2), e.g. (0.965, 0.99)")
    for b in betas:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 1:
            raise ValueError(f"{cls}(betas={betas!r}) is invalid; each beta must lie in [0, 1)")
    return float(betas[0]), float(betas[1])


class _Sophia(Optimizer):
    """The shared step, state and Hessian EMA of :class:`SophiaG` and :class:`SophiaH`."""

    #: which estimator :class:`~lightning_opt.callbacks.SophiaHessian` computes for this optimizer
    hessian_estimator: ClassVar[str] = ""
    #: the ``impl`` values this class takes besides ``"auto"`` (the contract suite runs each)
    impls: ClassVar[tuple[str, ...]] = tuple(SOPHIA_IMPLS)
    #: the diagonal-Hessian estimators (GNB's g*g, Hutchinson's u*Hu) are written for real
    #: parameters; a complex one is refused (base.reject_complex) rather than estimated wrongly
    supports_complex: ClassVar[bool] = False
    #: group options with the constructors' own checks (base.check_param_group runs them on a group)
    option_checks: ClassVar[dict[str, OptionCheck]] = {
        "betas": lambda cls, key, value: _check_betas(cls, value),
        "rho": as_option_check(_check),
        "bs": as_option_check(_check, positive=True),
    }

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        keep_state_dtype_on_load(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # checkpoints from before the options
        backfill_group_defaults(self, kahan_sum=False, stochastic_rounding=False, impl="auto")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # a group's own options are checked as the constructor's, before it is added
        super().add_param_group(check_param_group(self, param_group))

    def _scale(self, group: dict[str, Any]) -> float:
        raise NotImplementedError

    @staticmethod
    def _init_state(p: Tensor, state: dict[str, Any]) -> None:
        dt = compute_dtype(p)
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
        state["hessian"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)

    @torch.no_grad()
    def update_hessian(self, estimates: Sequence[Tensor | None] | None = None) -> None:
        """Fold diagonal-Hessian estimates into the EMA: ``h <- beta2 h + (1 - beta2) h_hat``.

        Args:
            estimates: one estimate (or ``None`` to skip) per parameter, in the order of
                ``[p for g in param_groups for p in g["params"]]``. SophiaG also accepts ``None``:
                then ``h_hat = p.grad * p.grad`` (the official code's convention; ``p.grad`` must
                hold the sampled-label gradient).

        Raises:
            ValueError: the number of estimates does not match the parameters, or a shape differs.
        """
        params = [p for g in self.param_groups for p in g["params"]]
        if estimates is None:
            estimates = self._default_estimates(params)
        estimates = list(estimates)
        if len(estimates) != len(params):
            raise ValueError(
                f"{type(self).__name__}.update_hessian got {len(estimates)} estimates for {len(params)} parameters"
            )
        it = iter(estimates)
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                est = next(it)
                if est is None:
                    continue
                if est.shape != p.shape:
                    raise ValueError(
                        f"{type(self).__name__}.update_hessian: estimate of shape {tuple(est.shape)} for a parameter of shape {tuple(p.shape)}"
                    )
                state = self.state[p]
                if "hessian" not in state:
                    self._init_state(p, state)
                hessian_ema_(state["hessian"], est.to(state["hessian"].device), beta2=beta2)

    def _default_estimates(self, params: list[Tensor]) -> list[Tensor | None]:
        raise ValueError(f"{type(self).__name__}.update_hessian needs estimates (see hutchinson_estimate)")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; ``closure`` (re-evaluating the loss) is called once, with grad enabled."""
        loss = run_closure(closure)
        for group in self.param_groups:
            params, grads, exp_avgs, hessians, comps, step_ts = [], [], [], [], [], []
            for p in params_with_grad(group, type(self).__name__):
                state = self.state[p]
                if "exp_avg" not in state:
                    self._init_state(p, state)
                ensure_kahan_comp(state, p, group["kahan_sum"])
                step_ts.append(state["step"])
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                hessians.append(state["hessian"])
                comps.append(state.get("kahan_comp") if group["kahan_sum"] else None)
            if step_ts:
                torch._foreach_add_(step_ts, 1)  # the group's step counts (CPU tensors) in one op, as torch does
            # the seeds of the stochastic rounding (CPU tensors: no device sync)
            steps = [int(s) for s in step_ts] if group["stochastic_rounding"] else [0] * len(step_ts)
            sophia(
                params,
                grads,
                exp_avgs,
                hessians,
                comps,
                lr=group["lr"],
                beta1=group["betas"][0],
                scale=self._scale(group),
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                stochastic=group["stochastic_rounding"],
                steps=steps,
                impl=group["impl"],
                name=type(self).__name__,
            )
        return loss

    @torch.no_grad()
    def clip_fraction(self) -> float:
        """Fraction of coordinates whose momentum is clipped now (``|m| >= max(scale h, eps)``).

        The paper's tuning signal is ``1 - clip_fraction()`` ("win rate"), best within 0.1-0.5.
        Computed on demand (one host sync), never inside ``step()``.
        """
        clipped = total = 0
        for group in self.param_groups:
            scale = self._scale(group)
            for p in group["params"]:
                state = self.state.get(p, {})
                if "exp_avg" in state:
                    denom = (state["hessian"] * scale).clamp_(min=group["eps"])
                    clipped += int((state["exp_avg"].abs() >= denom).sum())
                    total += p.numel()
        return clipped / total if total else 0.0


class SophiaG(_Sophia):
    """SophiaG: Sophia with the Gauss-Newton-Bartlett diagonal-Hessian estimator.

    Args:
        params: parameters or param-group dicts (extra keys such as ``param_names`` pass through).
        lr: learning rate, the largest per-coordinate step (default ``1e-4``; GPT-2 used 3e-4 to 7e-4).
        betas: ``(beta1, beta2)``, the momentum decay and the decay of the Hessian EMA (per
            refresh, not per step) (default ``(0.965, 0.99)``).
        rho: the clipping threshold ``gamma`` of the paper (default ``0.04``; GPT-2 used 0.05).
        weight_decay: decoupled decay ``p *= 1 - lr * weight_decay`` (default ``0.1``).
        bs: examples (tokens for a language model) per optimizer step: the ``B`` of the GNB
            estimator ``B * g_hat**2``, multiplied into the denominator as the official code does
            (default ``5120``, the official ``step(bs=...)`` default). A wrong ``bs`` rescales ``rho``.
        eps: floor of the denominator ``max(rho * bs * h, eps)`` (default ``1e-15``).
        kahan_sum: Kahan-compensate the steps of bf16/fp16 parameters, so steps below their
            resolution are not lost (default ``False``; float32 parameters need and get no buffer).
        stochastic_rounding: round the updated bf16 parameters stochastically instead (default
            ``False``; no extra memory; exclusive with ``kahan_sum``).
        impl: ``"auto"`` (default: the fused CPU kernel on the CPU, Triton on CUDA), ``"for_loop"``,
            ``"foreach"``, ``"fused"`` or ``"triton"`` for the step (see
            :mod:`lightning_opt.optim.engine`); the Hessian EMA refresh is per tensor.

    Raises:
        ValueError: negative or non-finite ``lr``/``rho``/``weight_decay``/``eps``, betas outside
            [0, 1), ``bs`` not positive; a flag not a bool, both roundings, an unknown ``impl``.

    Example:
        >>> opt = SophiaG(model.parameters(), lr=3e-4, rho=0.05, weight_decay=0.2, bs=480 * 1024)
        >>> # every k steps (SophiaHessian does this in a Trainer):
        >>> logits = model(x); y = torch.distributions.Categorical(logits=logits).sample()
        >>> F.cross_entropy(logits.flatten(0, -2), y.flatten()).backward(); opt.update_hessian()

    Matches the official ``Liuhong99/Sophia`` ``SophiaG`` (``sophia-opt`` 0.2.2) except ``max``
    for ``+ eps`` in the denominator (see the module docstring). Paper: Liu, Li, Hall, Liang & Ma,
    "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model Pre-training",
    arXiv:2305.14342.
    """

    hessian_estimator: ClassVar[str] = "gnb"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        bs: int = 5120,
        eps: float = 1e-15,
        *,
        kahan_sum: bool = False,
        stochastic_rounding: bool = False,
        impl: Impl = "auto",
    ) -> None:
        for key, value in (("lr", lr), ("rho", rho), ("weight_decay", weight_decay), ("eps", eps)):
            _check("SophiaG", key, value)
        _check("SophiaG", "bs", bs, positive=True)
        betas = _check_betas("SophiaG", betas)
        defaults = {"lr": lr, "betas": betas, "rho": rho, "weight_decay": weight_decay, "bs": bs, "eps": eps}
        rounding = check_rounding("SophiaG", kahan_sum, stochastic_rounding)
        super().__init__(params, {**defaults, **rounding, "impl": check_impl("SophiaG", impl, tuple(SOPHIA_IMPLS))})

    def _scale(self, group: dict[str, Any]) -> float:
        return group["rho"] * group["bs"]

    def _default_estimates(self, params: list[Tensor]) -> list[Tensor | None]:
        return gnb_estimate([p.grad for p in params])


class SophiaH(_Sophia):
    """SophiaH: Sophia with Hutchinson's diagonal-Hessian estimator ``u * (H u)``.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate, the largest per-coordinate step (default ``6e-4``, i.e.
            ``pytorch_optimizer.SophiaH``'s ``lr=6e-2`` times its clip ``p=1e-2``).
        betas: ``(beta1, beta2)``, the momentum decay and the decay of the Hessian EMA (default
            ``(0.96, 0.99)``).
        rho: the clipping threshold ``gamma`` of the paper (default ``0.01``).
        weight_decay: decoupled decay ``p *= 1 - lr * weight_decay`` (default ``0.0``).
        eps: floor of the denominator ``max(rho * h, eps)``; Hutchinson's ``h`` can be negative,
            which the floor turns into a full-size sign step (default ``1e-12``).
        kahan_sum: Kahan-compensate the steps of bf16/fp16 parameters (default ``False``).
        stochastic_rounding: round the updated bf16 parameters stochastically instead (default
            ``False``; exclusive with ``kahan_sum``).
        impl: ``"auto"`` (default), ``"for_loop"``, ``"foreach"``, ``"fused"`` or ``"triton"`` for
            the step.

    Raises:
        ValueError: negative or non-finite ``lr``/``rho``/``weight_decay``/``eps``, betas outside
            [0, 1); a flag not a bool, both roundings, an unknown ``impl``.

    Example:
        >>> opt = SophiaH(model.parameters(), lr=6e-4)
        >>> est = hutchinson_estimate(loss_fn(model), list(model.parameters()))
        >>> opt.update_hessian(est)  # every k steps; SophiaHessian does this in a Trainer

    Compared with ``pytorch_optimizer.SophiaH`` (``lr=lr'*p, rho=p, eps=p*eps', weight_decay=wd'/p``).
    Paper: arXiv:2305.14342 (Hutchinson: Hutchinson 1989; Yao et al., AdaHessian, arXiv:2006.00719).
    """

    hessian_estimator: ClassVar[str] = "hutchinson"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 6e-4,
        betas: tuple[float, float] = (0.96, 0.99),
        rho: float = 0.01,
        weight_decay: float = 0.0,
        eps: float = 1e-12,
        *,
        kahan_sum: bool = False,
        stochastic_rounding: bool = False,
        impl: Impl = "auto",
    ) -> None:
        for key, value in (("lr", lr), ("rho", rho), ("weight_decay", weight_decay), ("eps", eps)):
            _check("SophiaH", key, value)
        betas = _check_betas("SophiaH", betas)
        defaults = {"lr": lr, "betas": betas, "rho": rho, "weight_decay": weight_decay, "eps": eps}
        rounding = check_rounding("SophiaH", kahan_sum, stochastic_rounding)
        super().__init__(params, {**defaults, **rounding, "impl": check_impl("SophiaH", impl, tuple(SOPHIA_IMPLS))})

    def _scale(self, group: dict[str, Any]) -> float:
        return group["rho"]


_PAPER = "Liu et al., Sophia, arXiv:2305.14342"
register(
    OptimInfo(
        name="sophia",
        cls=SophiaG,
        default_lr=1e-4,
        description="SophiaG: clipped sign-momentum preconditioned by a GNB Hessian EMA",
        paper=_PAPER,
        callbacks=("lightning_opt.callbacks.sophia_hessian:SophiaHessian",),
    )
)
register(
    OptimInfo(
        name="sophia_h",
        cls=SophiaH,
        default_lr=6e-4,
        description="SophiaH: clipped sign-momentum preconditioned by a Hutchinson Hessian EMA",
        paper=_PAPER,
        callbacks=("lightning_opt.callbacks.sophia_hessian:SophiaHessian",),
    )
)
register_alias("SophiaOptimizer", "sophia", source="deepspeed")
