"""GrokAdamW: AdamW on a Grokfast-amplified gradient with layer-wise momentum decay.

Registered as ``grokadamw`` (also Hugging Face's name for it). There is no paper; the algorithm is
``cognitivecomputations/grokadamw`` (PyPI ``grokadamw`` 0.1.2), built on Grokfast (Lee et al. 2024,
arXiv:2405.20233). Differences from that package, all of them fixes of its state handling:

- the state lives in ``optimizer.state`` (the package keeps it in ``group["state"]`` on the CPU), so
  ``state_dict()`` saves it and a resumed run continues exactly;
- the per-tensor gradient clipping works on a copy: ``p.grad`` is left unchanged (the package clips
  ``p.grad`` in place, which the user sees and gradient accumulation compounds);
- exceptions raised by ``grokking_signal_fns`` propagate (the package logs and ignores them).
The layer index ``i`` in ``beta1 * (1 - gamma)**i`` counts, as the package does, only the tensors of
the group that have a gradient this step (a frozen tensor shifts the index of the tensors after it).
The update is the package's, step for step.
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
    backfill_group_defaults,
    check_betas,
    check_lr_wd,
    check_param_group,
    check_rounding,
    init_state,
    number_in,
    reject_sparse_grad,
    run_closure,
)
from lightning_opt.optim.engine import Impl, check_impl, dispatch
from lightning_opt.optim.layout import guard_param_layout
from lightning_opt.optim.precision import (
    LOW_PRECISION,
    apply_update_,
    apply_updates_,
    compute_dtype,
    exact_sqrt,
    sr_keys,
    tensor_norm,
    tensor_norms,
)
from lightning_opt.optim.registry import OptimInfo, register

__all__ = ["GROKADAMW_IMPLS", "GrokAdamW", "grokadamw", "grokadamw_update_", "grokking_signal_from_losses"]

# torch.nn.utils.clip_grad_norm_ divides by (norm + 1e-6); the reference clips with it
_CLIP_EPS = 1e-6


def grokking_signal_from_losses(train_loss: float | None, eval_loss: float | None) -> float:
    """``max(0, eval - train) / max(eval, train)``: the generalization gap, 0 when a loss is unknown."""
    if train_loss is None or eval_loss is None:
        return 0.0
    top = max(eval_loss, train_loss)
    return max(0.0, eval_loss - train_loss) / top if top > 0 else 0.0


def grokadamw_update_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    grok_ema: Tensor,
    *,
    step: int,
    lr: float,
    layer_beta1: float,
    bias_beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    alpha: float,
    lamb: float,
    gradient_clipping: float,
    kahan_comp: Tensor | None = None,
    stochastic: bool = False,
) -> None:
    """One GrokAdamW step for one tensor, in place on ``param`` and the three state tensors (the reference).

    ``g`` is clipped to norm ``gradient_clipping`` per tensor (if > 0; on a copy);
    ``e <- alpha e + (1-alpha) g``; ``h = g + lamb e``; ``m <- b m + (1-b) h`` with
    ``b = layer_beta1``; ``v <- beta2 v + (1-beta2) h^2``; ``p *= 1 - lr wd``;
    ``p -= lr sqrt(1-beta2^t) / (1-bias_beta1^t) m / (sqrt(v) + eps)``. The bias correction uses the
    group's beta1 (``bias_beta1``), not the layer's, as the reference does. ``kahan_comp`` /
    ``stochastic`` select the rounding of a bf16/fp16 parameter's store (see ``precision``; the
    stochastic rounding's bits are seeded by ``step``).
    """
    dt = compute_dtype(param)
    g = grad.to(dt, copy=True)
    if gradient_clipping > 0:
        # accumulated in float64 as every impl does (the fused kernel sums in double), see tensor_norm
        norm = tensor_norm(g)
        g.mul_((gradient_clipping / (norm + _CLIP_EPS)).clamp(max=1.0))
    m, v, e = exp_avg.to(dt), exp_avg_sq.to(dt), grok_ema.to(dt)
    e.mul_(alpha).add_(g, alpha=1 - alpha)
    h = g.add_(e, alpha=lamb)
    m.mul_(layer_beta1).add_(h, alpha=1 - layer_beta1)
    v.mul_(beta2).addcmul_(h, h, value=1 - beta2)
    step_size = _step_size(lr, bias_beta1, beta2, step)
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    # a correctly rounded root, as every impl takes (torch's CPU float32 sqrt is not: see exact_sqrt)
    delta = (m / exact_sqrt(v).add_(eps)).mul_(-step_size)
    if m is not exp_avg:
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
        grok_ema.copy_(e)
    apply_update_(param, delta, kahan_comp, stochastic=stochastic, seed=step)


def _step_size(lr: float, beta1: float, beta2: float, step: int) -> float:
    return lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)


def _grok_for_loop(params, grads, exp_avgs, exp_avg_sqs, grok_emas, kahan_comps, steps, layer_beta1s, *, beta1, **hp):
    lists = (params, grads, exp_avgs, exp_avg_sqs, grok_emas, kahan_comps, steps, layer_beta1s)
    for p, g, m, v, e, c, s, b in zip(*lists):
        grokadamw_update_(p, g, m, v, e, step=s, layer_beta1=b, bias_beta1=beta1, kahan_comp=c, **hp)


def _grok_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    grok_emas: list[Tensor],
    kahan_comps: list[Tensor | None],
    steps: list[int],
    layer_beta1s: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    alpha: float,
    lamb: float,
    gradient_clipping: float,
    stochastic: bool = False,
) -> None:
    dt = compute_dtype(params[0])
    low = params[0].dtype in LOW_PRECISION
    g = [x.to(dt, copy=True) for x in grads]
    if gradient_clipping > 0:
        norms = tensor_norms(g)
        torch._foreach_mul_(g, list((gradient_clipping / (norms + _CLIP_EPS)).clamp(max=1.0).unbind(0)))
    m, v, e = ([x.to(dt) for x in xs] for xs in (exp_avgs, exp_avg_sqs, grok_emas))
    torch._foreach_mul_(e, alpha)
    torch._foreach_add_(e, g, alpha=1 - alpha)
    torch._foreach_add_(g, e, alpha=lamb)  # h
    torch._foreach_mul_(m, layer_beta1s)
    # a per-tensor alpha: no foreach op takes a list of them
    for mi, hi, b in zip(m, g, layer_beta1s):
        mi.add_(hi, alpha=1 - b)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, g, g, value=1 - beta2)
    if weight_decay != 0:
        if low:
            # torch's CPU foreach ops round a scalar to bf16/fp16 first: decay in float32, round once
            wide = [p.float() for p in params]
            torch._foreach_mul_(wide, 1 - lr * weight_decay)
            torch._foreach_copy_(params, wide)
        else:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
    denom = [exact_sqrt(x) for x in v]
    torch._foreach_add_(denom, eps)
    delta = torch._foreach_div(m, denom)
    torch._foreach_mul_(delta, [-_step_size(lr, beta1, beta2, s) for s in steps])
    if low:
        torch._foreach_copy_(exp_avgs, m)
        torch._foreach_copy_(exp_avg_sqs, v)
        torch._foreach_copy_(grok_emas, e)
    apply_updates_(params, delta, kahan_comps, stochastic=stochastic, seeds=steps)


def _grok_fused(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    grok_emas,
    kahan_comps,
    steps,
    layer_beta1s,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    alpha,
    lamb,
    gradient_clipping,
    stochastic=False,
) -> None:
    from lightning_opt.kernels import cpu

    for p, g in zip(params, grads):
        if g.dtype != p.dtype:  # the kernel reads a gradient as the parameter's type
            raise TypeError(
                f"GrokAdamW(impl='fused') needs gradients in the parameters' dtype, got a {g.dtype} gradient for "
                f"a {p.dtype} parameter; use impl='for_loop'"
            )
    per = [x for b, s in zip(layer_beta1s, steps) for x in (b, _step_size(lr, beta1, beta2, s))]
    cpu.launch(
        "grokadamw",
        "grokadamw",
        [params, grads, exp_avgs, exp_avg_sqs, grok_emas, kahan_comps],
        [lr, beta2, eps, weight_decay, alpha, lamb, gradient_clipping, *per],
        [int(stochastic), *sr_keys(stochastic, steps, len(params))],  # then each tensor's seed key
        state_dtype=exp_avgs[0].dtype,
    )


def _grok_triton(*args: Any, **kwargs: Any) -> None:
    from lightning_opt.kernels.triton_grokadamw import grokadamw_triton_

    grokadamw_triton_(*args, **kwargs)


#: GrokAdamW's implementations, by ``impl`` name (``for_loop`` is the reference)
GROKADAMW_IMPLS: dict[str, Callable[..., Any]] = {
    "for_loop": _grok_for_loop,
    "foreach": _grok_foreach,
    "fused": _grok_fused,
    "triton": _grok_triton,
}


def grokadamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    grok_emas: list[Tensor],
    kahan_comps: list[Tensor | None],
    steps: list[int],
    layer_beta1s: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    alpha: float,
    lamb: float,
    gradient_clipping: float,
    stochastic: bool = False,
    impl: str = "auto",
) -> None:
    """GrokAdamW over tensor lists (the functional API): :func:`grokadamw_update_` per tensor, by ``impl``.

    ``steps`` are the tensors' 1-based step counts and ``layer_beta1s`` their ``beta1 (1 - gamma)**i``;
    ``beta1`` is the group's (the bias correction's); ``alpha`` the group's EMA weight this step.
    """
    dispatch(
        "GrokAdamW",
        "grokadamw",
        impl,
        GROKADAMW_IMPLS,
        reduces=True,
        lists={
            "params": params,
            "grads": grads,
            "exp_avgs": exp_avgs,
            "exp_avg_sqs": exp_avg_sqs,
            "grok_emas": grok_emas,
            "kahan_comps": kahan_comps,
            "steps": steps,
            "layer_beta1s": layer_beta1s,
        },
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        alpha=alpha,
        lamb=lamb,
        gradient_clipping=gradient_clipping,
        stochastic=stochastic,
    )


class GrokAdamW(Optimizer):
    """AdamW on ``g + lamb * EMA(g)`` (Grokfast's slow-gradient amplification), with layer-wise beta1.

    The EMA weight ``alpha = alpha_init * exp(-grokking_signal_decay_rate * signal)`` shrinks as the
    grokking signal grows; the signal is the mean of ``grokking_signal_fns()`` (functions returning
    ``None`` are skipped), or, without functions, the gap ``max(0, eval-train)/max(eval, train)``
    from ``group["train_loss"]``/``group["eval_loss"]``, which the user may set on a param group
    (0 while unset). The ``i``-th tensor with a gradient in a group uses ``beta1 * (1 - gamma)**i``.
    The gradient clipping is per tensor (a local shard under FSDP would be clipped on its own norm).

    Args:
        params: parameters or param-group dicts.
        lr: learning rate (default ``1e-3``).
        betas: moment decay rates (default ``(0.9, 0.999)``).
        eps: added to ``sqrt(v)`` (default ``1e-8``).
        weight_decay: decoupled decay ``p *= 1 - lr * weight_decay`` (default ``1e-2``).
        alpha_init: EMA weight of the slow gradient at zero signal, in [0, 1] (default ``0.98``).
        lamb: amplification of the slow gradient (default ``2.0``).
        gamma: layer-wise beta1 decay, in [0, 1) (default ``0.1``).
        grokking_signal_fns: callables returning a float signal (or ``None``), averaged each step;
            not saved in ``state_dict`` (default ``None``: use the group's losses).
        grokking_signal_decay_rate: how fast ``alpha`` falls with the signal (default ``0.1``).
        gradient_clipping: per-tensor gradient-norm cap, ``0`` disables it (default ``1.0``).
        kahan_sum: Kahan-compensate bf16/fp16 parameter updates (default ``False``).
        stochastic_rounding: round the updated bf16 parameters stochastically instead (default
            ``False``; no extra memory; exclusive with ``kahan_sum``).
        impl: ``"auto"`` (default: the fused CPU kernel on the CPU), ``"for_loop"``, ``"foreach"``
            or ``"fused"`` (see :mod:`lightning_opt.optim.engine`).

    Raises:
        ValueError: invalid lr, weight_decay, eps, betas, alpha_init, gamma or gradient_clipping;
            a flag not a bool, both roundings, an unknown ``impl``.
        TypeError: ``grokking_signal_fns`` is not a sequence of callables.

    Example:
        >>> opt = GrokAdamW(model.parameters(), lr=1e-3, lamb=2.0)
        >>> opt.param_groups[0]["eval_loss"] = 2.3  # optional: feeds the default signal

    Source: cognitivecomputations/grokadamw (no paper); Grokfast: Lee et al., arXiv:2405.20233.
    """

    #: the ``impl`` values this class takes besides ``"auto"`` (the contract suite runs each)
    impls: ClassVar[tuple[str, ...]] = tuple(GROKADAMW_IMPLS)
    #: per-tensor statistics have no complex form here (base.reject_complex)
    supports_complex: ClassVar[bool] = False
    #: group options with their own checks (base.check_options: the constructor's and each group's)
    option_checks: ClassVar[dict[str, OptionCheck]] = {
        "alpha_init": number_in(lambda x: 0 <= x <= 1, "it must be a number in [0, 1]"),
        "gamma": number_in(lambda x: 0 <= x < 1, "it must be a number in [0, 1)"),
        "lamb": number_in(lambda x: True, "it must be a finite number"),
        "grokking_signal_decay_rate": number_in(lambda x: True, "it must be a finite number"),
        "gradient_clipping": number_in(lambda x: x >= 0, "it must be a finite number >= 0 (0 disables it)"),
    }

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        alpha_init: float = 0.98,
        lamb: float = 2.0,
        gamma: float = 0.1,
        grokking_signal_fns: Sequence[Callable[[], float | None]] | None = None,
        grokking_signal_decay_rate: float = 0.1,
        gradient_clipping: float = 1.0,
        kahan_sum: bool = False,
        stochastic_rounding: bool = False,
        impl: Impl = "auto",
    ) -> None:
        check_lr_wd("GrokAdamW", lr, weight_decay)
        betas = check_betas("GrokAdamW", betas)
        checks = {
            "eps": (eps, lambda x: x >= 0, "a finite number >= 0"),
            "alpha_init": (alpha_init, lambda x: 0 <= x <= 1, "a number in [0, 1]"),
            "gamma": (gamma, lambda x: 0 <= x < 1, "a number in [0, 1)"),
            "lamb": (lamb, lambda x: True, "a finite number"),
            "grokking_signal_decay_rate": (grokking_signal_decay_rate, lambda x: True, "a finite number"),
            "gradient_clipping": (gradient_clipping, lambda x: x >= 0, "a finite number >= 0 (0 disables it)"),
        }
        for key, (value, ok, want) in checks.items():
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or not ok(value)
            ):
                raise ValueError(f"GrokAdamW({key}={value!r}) is invalid; it must be {want}")
        if grokking_signal_fns is not None:
            if callable(grokking_signal_fns) or not all(callable(f) for f in grokking_signal_fns):
                raise TypeError("GrokAdamW(grokking_signal_fns=...) must be a list of zero-argument callables")
            grokking_signal_fns = list(grokking_signal_fns)
        # callables cannot be saved in a checkpoint: kept on the object, not in the param groups
        self.grokking_signal_fns = grokking_signal_fns
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "alpha_init": alpha_init,
            "lamb": lamb,
            "gamma": gamma,
            "grokking_signal_decay_rate": grokking_signal_decay_rate,
            "gradient_clipping": gradient_clipping,
            **check_rounding("GrokAdamW", kahan_sum, stochastic_rounding),
            "impl": check_impl("GrokAdamW", impl, tuple(GROKADAMW_IMPLS)),
        }
        super().__init__(params, defaults)
        guard_param_layout(self, type(self).__name__, "clips each parameter's gradient by its whole norm")

    def __getstate__(self) -> dict[str, Any]:
        # torch pickles only defaults/state/param_groups; keep the signal functions on copies
        return {**super().__getstate__(), "grokking_signal_fns": self.grokking_signal_fns}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("grokking_signal_fns", None)
        backfill_group_defaults(self, kahan_sum=False, stochastic_rounding=False, impl="auto")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # a group's own options are checked as the constructor's, before it is added
        super().add_param_group(check_param_group(self, param_group))

    def _signal(self, group: dict[str, Any]) -> float | None:
        if self.grokking_signal_fns is None:
            return grokking_signal_from_losses(group.get("train_loss"), group.get("eval_loss"))
        values = [v for v in (fn() for fn in self.grokking_signal_fns) if v is not None]
        return sum(values) / len(values) if values else None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; ``closure`` is called once, with grad enabled."""
        loss = run_closure(closure)
        for group in self.param_groups:
            if all(p.grad is None for p in group["params"]):
                continue
            signal = self._signal(group)
            alpha = group["alpha_init"]
            if signal is not None:
                alpha = alpha * math.exp(-group["grokking_signal_decay_rate"] * signal)
            beta1, beta2 = group["betas"]
            # the layer index counts only tensors with a grad this step, as the reference does
            params, grads, exp_avgs, exp_avg_sqs, emas, comps, steps, layer_beta1s = ([] for _ in range(8))
            for p in group["params"]:
                if p.grad is None:
                    continue
                reject_sparse_grad(p, "GrokAdamW")
                state = self.state[p]
                init_state(state, p, "exp_avg", "exp_avg_sq", "grok_ema", kahan_sum=group["kahan_sum"])
                state["step"] += 1
                layer_beta1s.append(beta1 * (1 - group["gamma"]) ** len(params))
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                emas.append(state["grok_ema"])
                comps.append(state.get("kahan_comp") if group["kahan_sum"] else None)
                steps.append(state["step"])
            grokadamw(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                emas,
                comps,
                steps,
                layer_beta1s,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                alpha=alpha,
                lamb=group["lamb"],
                gradient_clipping=group["gradient_clipping"],
                stochastic=group["stochastic_rounding"],
                impl=group["impl"],
            )
        return loss


register(
    OptimInfo(
        name="grokadamw",
        cls=GrokAdamW,
        description="GrokAdamW: AdamW on a Grokfast-amplified gradient, layer-wise beta1",
        paper="cognitivecomputations/grokadamw (no paper); Grokfast, Lee et al., arXiv:2405.20233",
        default_lr=1e-3,
    )
)
