"""Adafactor: factored second moment, relative step size, update clipping (Shazeer & Stern 2018).

Registered as ``adafactor`` with torch's defaults (``torch.optim.Adafactor``'s algorithm); the
options also give ``transformers.Adafactor``'s algorithm (see :data:`TRANSFORMERS_ADAFACTOR`), which
is what Hugging Face's ``TrainingArguments(optim="adafactor")`` builds through
:func:`lightning_opt.from_hf_training_args`. DeepSpeed's ``AdaFactorOptimizer`` resolves here too.

The update of one tensor ``P`` (gradient ``G``, step ``t``):

- ``b2_t = 1 - t^decay_rate`` (or the paper's debiased fixed ``beta2``: ``beta2 (1 - beta2^(t-1)) / (1 - beta2^t)``);
- ``>= 2-D`` (factored over the last two dims): ``R <- b2_t R + (1 - b2_t) rowmean(G^2)``,
  ``C <- b2_t C + (1 - b2_t) colmean(G^2)``, ``V = R C / mean(R)``; ``1-D``: ``V <- b2_t V + (1 - b2_t) G^2``;
- ``U = G / sqrt(V)``, clipped: ``U <- U / max(1, RMS(U) / clip_threshold)``;
- ``rho_t = min(lr, 1/sqrt(t))`` (``relative_step``; ``min(lr, 1e-6 t, 1/sqrt(t))`` with
  ``warmup_init``) or ``lr``; ``alpha_t = rho_t max(eps2, RMS(P))`` (``scale_parameter``) or ``rho_t``;
- weight decay ``P *= 1 - lr wd`` (``weight_decay_mode="lr"``, torch) or ``1 - alpha_t wd`` (``"step_size"``, transformers);
- ``M <- beta1 M + (1 - beta1) alpha_t U`` with ``beta1`` (transformers' momentum of the scaled update); ``P -= alpha_t U`` (or ``M``).

``eps1`` enters as torch puts it (``eps1_mode="clamp"``: ``mean(R) >= eps1``, ``V >= eps1^2``) or as
the paper and transformers do (``"add"``: ``G^2 + eps1`` in the statistics).

FSDP2 (DTensor shards): every tensor is computed on its local shard. Row statistics stay with the
rows; column statistics, ``mean(R)`` and the two RMS are local partial sums completed by all-reduces
that are coalesced over every sharded parameter of every group: two per step (statistics and
``RMS(P)``; then ``RMS(U)``, which needs the completed statistics), not one per parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_opt.optim.base import (
    check_arg,
    check_flag,
    check_lr_wd,
    is_number,
    keep_state_dtype_on_load,
    params_with_grad,
    run_closure,
)
from lightning_opt.optim.engine import Impl, check_impl, resolve_impl
from lightning_opt.optim.layout import guard_param_layout
from lightning_opt.optim.precision import (
    Partials,
    compute_dtype,
    is_dtensor,
    local,
    matrix_state_dtype,
    run_reduction_rounds,
    shard_split,
)
from lightning_opt.optim.registry import OptimInfo, register, register_alias
from lightning_opt.optim.stable_adamw import debias_beta

__all__ = ["ADAFACTOR_IMPLS", "TORCH_ADAFACTOR", "TRANSFORMERS_ADAFACTOR", "Adafactor", "adafactor", "adafactor_rounds"]

Eps1Mode = Literal["clamp", "add"]
WeightDecayMode = Literal["lr", "step_size"]

#: the options that reproduce ``torch.optim.Adafactor`` (torch 2.13; also this class's defaults)
TORCH_ADAFACTOR: dict[str, Any] = {
    "eps": (None, 1e-3),
    "clip_threshold": 1.0,
    "decay_rate": -0.8,
    "beta1": None,
    "relative_step": True,
    "scale_parameter": True,
    "warmup_init": False,
    "eps1_mode": "clamp",
    "weight_decay_mode": "lr",
}
#: the options that reproduce ``transformers.Adafactor``'s defaults (its ``lr=None`` is ``lr=1e-2`` here:
#: the cap of the relative step); Hugging Face's Trainer passes ``relative_step=False,
#: scale_parameter=False`` and its learning rate on top of these
TRANSFORMERS_ADAFACTOR: dict[str, Any] = {
    **TORCH_ADAFACTOR,
    "eps": (1e-30, 1e-3),
    "eps1_mode": "add",
    "weight_decay_mode": "step_size",
}

_DEFAULTS = {"lr": 1e-2, "weight_decay": 0.0, "beta2": None, "maximize": False, "impl": "auto", **TORCH_ADAFACTOR}


# --------------------------------------------------------------------------------------------------
# sharding: a DTensor shard's state (the split dim and the all-reduces come from the shared
# service: precision.shard_split, precision.run_reduction_rounds)


def _state_zeros(p: Tensor, reduced: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Zeros shaped like ``p`` with the ``reduced`` dims of size 1; a DTensor for a DTensor ``p``.

    A dim of ``p`` that is split across ranks and reduced here becomes ``Replicate`` (the statistic is
    complete on every rank after the all-reduce); the other placements are ``p``'s, so the state is
    sharded with ``p`` and a sharded checkpoint (DCP) stores each rank's part.
    """
    mine = local(p)
    shape = [1 if d in reduced else n for d, n in enumerate(mine.shape)]
    zeros = torch.zeros(shape, dtype=dtype, device=mine.device)
    if not is_dtensor(p):
        return zeros
    from torch.distributed.tensor import DTensor, Replicate

    placements = [Replicate() if pl.is_shard() and pl.dim % p.ndim in reduced else pl for pl in p.placements]
    global_shape = torch.Size(1 if d in reduced else n for d, n in enumerate(p.shape))
    stride = torch.empty(global_shape, device="meta").stride()
    return DTensor.from_local(zeros, p.device_mesh, placements, run_check=False, shape=global_shape, stride=stride)


# --------------------------------------------------------------------------------------------------
# the math, per tensor in three phases around the two reductions


def _step_size(step: int, *, lr: float, relative_step: bool, warmup_init: bool) -> float:
    """``rho_t``: ``min(lr, 1/sqrt(t))`` (``min(lr, 1e-6 t, 1/sqrt(t))`` with warmup) or ``lr``."""
    if not relative_step:
        return lr
    cap = min(lr, 1e-6 * step) if warmup_init else lr
    return min(cap, 1.0 / math.sqrt(step))


def _adafactor_tensor(
    param: Tensor,
    grad: Tensor,
    row_var: Tensor | None,
    col_var: Tensor | None,
    variance: Tensor | None,
    exp_avg: Tensor | None,
    step: int,
    shard: tuple[int, Any] | None,
    shape: torch.Size,
    *,
    lr: float,
    beta1: float | None,
    beta2: float | None,
    decay_rate: float,
    eps1: float | None,
    eps2: float,
    clip_threshold: float,
    relative_step: bool,
    scale_parameter: bool,
    warmup_init: bool,
    weight_decay: float,
    weight_decay_mode: str,
    eps1_mode: str,
    maximize: bool,
) -> Generator[list[Tensor], None, None]:
    """One Adafactor step of one (local) tensor, as a generator.

    It yields twice the partial sums that must be summed across the ranks sharing the tensor (empty
    lists for a whole tensor) and continues once they hold the totals. ``shape`` is the global shape.
    """
    nd = len(shape)
    split = shard[0] if shard is not None else None
    dt = compute_dtype(param)
    g = grad.to(dt)
    if maximize:
        g = -g
    p = param if param.dtype == dt else param.to(dt)
    if eps1 is None:
        eps1 = torch.finfo(param.dtype).eps  # torch's default, from the parameter's dtype
    b2 = debias_beta(beta2, step) if beta2 is not None else 1.0 - step**decay_rate
    rho = _step_size(step, lr=lr, relative_step=relative_step, warmup_init=warmup_init)

    # phase 1: local statistics; partial sums wait for the first all-reduce
    sum_p2 = p.square().sum()
    partial = [sum_p2] if split is not None else []
    gsq = g * g
    if eps1_mode == "add":
        gsq.add_(eps1)
    if nd >= 2:
        rows, cols = shape[-2], shape[-1]
        row_sum = gsq.sum(dim=-1, keepdim=True)
        col_sum = gsq.sum(dim=-2, keepdim=True)
        del gsq
        rows_split, cols_split = split == nd - 1, split == nd - 2
        sum_r = None
        if not rows_split:  # every row is whole here: R and its partial sum over rows now
            row_var.lerp_(row_sum.div_(cols), 1.0 - b2)
            sum_r = row_var.sum(dim=-2, keepdim=True)
            if cols_split:
                partial.append(sum_r)
        else:
            partial.append(row_sum)
        if cols_split:
            partial.append(col_sum)
    else:
        variance.lerp_(gsq, 1.0 - b2)
        del gsq
    yield partial

    # phase 2: the direction U = G / sqrt(V) and its partial sum of squares
    if nd >= 2:
        if rows_split:
            row_var.lerp_(row_sum.div_(cols), 1.0 - b2)
            sum_r = row_var.sum(dim=-2, keepdim=True)
        col_var.lerp_(col_sum.div_(rows), 1.0 - b2)
        mean_r = sum_r.div_(rows)
        if eps1_mode == "clamp":
            mean_r.clamp_(min=eps1)
            v = (row_var * col_var).div_(mean_r)  # the rank-1 outer product R C (torch: row_var @ col_var)
        else:
            # transformers' order, R / mean(R) first: with eps1 = 1e-30 added, R C itself underflows
            # float32 (1e-60) for zero gradients (DCP's zero-lr state init) and rsqrt(0) * 0 is NaN
            v = (row_var / mean_r) * col_var
    else:
        v = variance.clone()
    if eps1_mode == "clamp":
        v.clamp_(min=eps1 * eps1)
    update = v.rsqrt_().mul_(g)
    del g
    sum_u2 = update.square().sum()
    yield [sum_u2] if split is not None else []

    # phase 3: clip, scale, decay, apply
    numel = math.prod(shape)
    clip = (sum_u2 / numel).sqrt_().div_(clip_threshold).clamp_(min=1.0)
    alpha = (sum_p2 / numel).sqrt_().clamp_(min=eps2).mul_(rho) if scale_parameter else rho
    if weight_decay != 0:
        p.mul_(1 - (lr if weight_decay_mode == "lr" else alpha) * weight_decay)
    update.mul_(alpha / clip)
    if beta1 is not None:
        exp_avg.mul_(beta1).add_(update, alpha=1 - beta1)
        update = exp_avg
    p.sub_(update)
    if p is not param:
        param.copy_(p)


def _adafactor_for_loop(
    params: list[Tensor],
    grads: list[Tensor],
    row_vars: list[Tensor | None],
    col_vars: list[Tensor | None],
    variances: list[Tensor | None],
    exp_avgs: list[Tensor | None],
    steps: list[int],
    shards: list[tuple[int, Any] | None],
    shapes: list[torch.Size],
    **hp: Any,
) -> Generator[list[tuple[Any, Tensor]], None, None]:
    """Adafactor over local tensor lists, one tensor at a time.

    Whole tensors are stepped to the end at once. The sharded ones advance together and yield, twice,
    their ``(process group, partial sum)`` pairs, which the caller all-reduces (coalesced with the
    other groups') before resuming; so the reductions never run once per parameter.
    """
    sharded = []
    for p, g, r, c, v, m, s, sh, shape in zip(params, grads, row_vars, col_vars, variances, exp_avgs, steps, shards, shapes):
        gen = _adafactor_tensor(p, g, r, c, v, m, s, sh, shape, **hp)
        if sh is None:
            for _ in gen:
                pass
        else:
            sharded.append((sh[1], gen))
    if not sharded:
        return
    for _round in range(2):
        yield [(group, t) for group, gen in sharded for t in next(gen)]
    for _, gen in sharded:
        for _ in gen:
            pass


#: Adafactor's implementations, by ``impl`` name (``for_loop`` is the reference and the only one:
#: each tensor's two RMS reductions and its rank-1 statistics leave little for multi-tensor ops)
ADAFACTOR_IMPLS = {"for_loop": _adafactor_for_loop}


def adafactor(
    params: list[Tensor],
    grads: list[Tensor],
    row_vars: list[Tensor | None],
    col_vars: list[Tensor | None],
    variances: list[Tensor | None],
    exp_avgs: list[Tensor | None],
    steps: list[int],
    *,
    impl: str = "auto",
    **hp: Any,
) -> None:
    """Adafactor over tensor lists (the functional API), DTensor shards included.

    ``steps`` holds each tensor's 1-based step (already incremented); ``hp`` are the options of
    :class:`Adafactor` (``lr``, ``beta1``, ``beta2``, ``decay_rate``, ``eps1``, ``eps2``,
    ``clip_threshold``, ``relative_step``, ``scale_parameter``, ``warmup_init``, ``weight_decay``,
    ``weight_decay_mode``, ``eps1_mode``, ``maximize``).
    """
    run_reduction_rounds(
        [adafactor_rounds(params, grads, row_vars, col_vars, variances, exp_avgs, steps, impl=impl, **hp)]
    )


def adafactor_rounds(
    params: list[Tensor],
    grads: list[Tensor],
    row_vars: list[Tensor | None],
    col_vars: list[Tensor | None],
    variances: list[Tensor | None],
    exp_avgs: list[Tensor | None],
    steps: list[int],
    *,
    impl: str = "auto",
    cls: str = "Adafactor",
    **hp: Any,
) -> Iterator[Partials]:
    """:func:`adafactor` (the same seven lists, ``impl`` and options) as a generator for
    :func:`~lightning_opt.optim.precision.run_reduction_rounds`.

    Whole tensors are stepped at the first ``next``; the DTensor shards yield their ``(process group,
    partial sum)`` pairs twice (the statistics and ``RMS(P)``, then ``RMS(U)``) and finish once the
    pairs hold the sums, so several calls (every param group, or another family on Adafactor's
    math) share one coalesced all-reduce per round. The state tensors may be DTensors or their
    local tensors (views laid out like the local shard); ``cls`` names the optimizer in errors.

    Raises:
        NotImplementedError: a DTensor with a ``Partial`` placement or split along more than one mesh dim.
    """
    if not params:
        return iter(())
    chosen = resolve_impl(cls, impl, tuple(ADAFACTOR_IMPLS), params[0], "adafactor")
    opt = lambda xs: [None if x is None else local(x) for x in xs]  # noqa: E731
    return ADAFACTOR_IMPLS[chosen](
        [local(p) for p in params],
        [local(g) for g in grads],
        opt(row_vars),
        opt(col_vars),
        opt(variances),
        opt(exp_avgs),
        steps,
        [shard_split(cls, p) for p in params],
        [p.shape for p in params],
        **hp,
    )


# --------------------------------------------------------------------------------------------------
# the class


def _check_options(cls: str, o: dict[str, Any]) -> None:
    """Every Adafactor option of a group (or of the defaults), with the hint to fix it."""
    check_lr_wd(cls, o["lr"], o["weight_decay"])
    eps = o["eps"]
    ok = isinstance(eps, (tuple, list)) and len(eps) == 2
    ok = ok and (eps[0] is None or (is_number(eps[0]) and eps[0] >= 0)) and is_number(eps[1]) and eps[1] >= 0
    check_arg(cls, "eps", eps, ok, "expected (eps1, eps2): eps1 a finite number >= 0 or None (the dtype's eps), eps2 >= 0")
    clip = o["clip_threshold"]
    check_arg(cls, "clip_threshold", clip, isinstance(clip, (int, float)) and not isinstance(clip, bool) and clip > 0, "it must be a number > 0 (inf: no clipping)")
    check_arg(cls, "decay_rate", o["decay_rate"], is_number(o["decay_rate"]) and o["decay_rate"] <= 0, "it must be a finite number <= 0 (beta2_t = 1 - t^decay_rate)")
    for key in ("beta1", "beta2"):
        b = o[key]
        check_arg(cls, key, b, b is None or (is_number(b) and 0 <= b < 1), "it must be None or lie in [0, 1)")
    if o["beta2"] is not None and o["decay_rate"] != _DEFAULTS["decay_rate"]:
        raise ValueError(
            f"{cls}(beta2={o['beta2']!r}, decay_rate={o['decay_rate']!r}) is invalid; a fixed beta2 replaces the "
            "decay_rate schedule: give one of them"
        )
    for key in ("relative_step", "scale_parameter", "warmup_init", "maximize"):
        check_flag(cls, key, o[key])
    if o["warmup_init"] and not o["relative_step"]:
        raise ValueError(f"{cls}(warmup_init=True) warms up the relative step; it needs relative_step=True")
    for key, kind in (("eps1_mode", Eps1Mode), ("weight_decay_mode", WeightDecayMode)):
        check_arg(cls, key, o[key], o[key] in get_args(kind), f"expected one of {get_args(kind)}")
    check_impl(cls, o["impl"], tuple(ADAFACTOR_IMPLS))


class Adafactor(Optimizer):
    """Adafactor with torch's defaults; its options also give transformers' variant.

    ``Adafactor(params)`` steps exactly as ``torch.optim.Adafactor(params)`` (torch 2.13), and
    ``Adafactor(params, lr=1e-2, **TRANSFORMERS_ADAFACTOR)`` as ``transformers.Adafactor(params)``
    (both proven in float64 in ``tests/optim/test_adafactor.py``). On FSDP2 DTensor shards it
    computes on the local shards with coalesced all-reduces (module docstring) and equals the
    unsharded run.

    Args:
        params: parameters or param-group dicts (every option below may be set per group).
        lr: the relative step's cap with ``relative_step`` (``rho_t = min(lr, 1/sqrt(t))``, torch's
            meaning), else the step size (default ``1e-2``).
        weight_decay: decoupled decay (default ``0.0``), scaled as ``weight_decay_mode`` says.
        eps: ``(eps1, eps2)`` (default ``(None, 1e-3)``): eps1 regularizes the squared gradient
            (``None``: the parameter dtype's machine eps, torch's default; transformers uses
            ``1e-30``), eps2 floors ``RMS(P)`` in the parameter scale.
        clip_threshold: ``d`` of the update clipping ``U / max(1, RMS(U)/d)`` (default ``1.0``;
            torch's ``d``).
        decay_rate: ``beta2_t = 1 - t^decay_rate`` (default ``-0.8``; torch's ``beta2_decay``).
        beta1: momentum of the scaled update as transformers' (default ``None``: no first moment,
            the paper's and torch's setting).
        beta2: a fixed second-moment decay instead of the schedule, debiased as in the paper
            (``beta2 (1 - beta2^(t-1)) / (1 - beta2^t)``); default ``None`` (the schedule).
        relative_step: ``rho_t = min(lr, 1/sqrt(t))`` (default ``True``); ``False``: ``rho_t = lr``.
        scale_parameter: multiply the step by ``max(eps2, RMS(P))`` (default ``True``).
        warmup_init: ``rho_t = min(lr, 1e-6 t, 1/sqrt(t))``, transformers' warm start (default
            ``False``; needs ``relative_step``).
        eps1_mode: ``"clamp"`` (default, torch: ``mean(R) >= eps1`` and ``V >= eps1^2``) or
            ``"add"`` (the paper and transformers: ``G^2 + eps1`` enters the statistics).
        weight_decay_mode: ``"lr"`` (default, torch: ``P *= 1 - lr wd``) or ``"step_size"``
            (transformers: ``P *= 1 - alpha_t wd``, the scaled relative step).
        maximize: ascend instead of descend (default ``False``).
        impl: ``"auto"`` or ``"for_loop"`` (the only implementation).

    Raises:
        ValueError: an invalid option (also in ``add_param_group``); ``warmup_init`` without
            ``relative_step``; both ``beta2`` and a ``decay_rate``; a complex parameter
            ("adafactor does not support complex parameters": its statistics are per matrix row and
            column of real values).
        NotImplementedError: at the first step, a DTensor split along more than one mesh dim or with a
            ``Partial`` placement (unreduced gradients).

    State per tensor: ``step`` (a float32 tensor, as torch's), ``row_var`` ``[..., R, 1]`` and
    ``col_var`` ``[..., 1, C]`` for ``>= 2-D`` (``variance`` for ``< 2-D``), ``exp_avg`` with
    ``beta1``; float32 for bf16/fp16 parameters (kept so through ``load_state_dict``). A
    ``torch.optim.Adafactor`` checkpoint loads and continues (its ``d``/``beta2_decay`` read as
    ``clip_threshold``/``decay_rate``).

    Example:
        >>> opt = Adafactor(model.parameters())  # torch's Adafactor
        >>> opt = Adafactor(model.parameters(), lr=1e-3, relative_step=False, scale_parameter=False,
        ...                 **{k: v for k, v in TRANSFORMERS_ADAFACTOR.items() if k not in ("relative_step", "scale_parameter")})

    Paper: Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost",
    arXiv:1804.04235.
    """

    #: the ``impl`` values this class takes besides ``"auto"`` (the contract suite runs each)
    impls: ClassVar[tuple[str, ...]] = tuple(ADAFACTOR_IMPLS)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        eps: tuple[float | None, float] = (None, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        weight_decay: float = 0.0,
        *,
        beta1: float | None = None,
        beta2: float | None = None,
        relative_step: bool = True,
        scale_parameter: bool = True,
        warmup_init: bool = False,
        eps1_mode: Eps1Mode = "clamp",
        weight_decay_mode: WeightDecayMode = "lr",
        maximize: bool = False,
        impl: Impl = "auto",
    ) -> None:
        defaults = {
            "lr": lr,
            "eps": tuple(eps) if isinstance(eps, list) else eps,
            "clip_threshold": clip_threshold,
            "decay_rate": decay_rate,
            "weight_decay": weight_decay,
            "beta1": beta1,
            "beta2": beta2,
            "relative_step": relative_step,
            "scale_parameter": scale_parameter,
            "warmup_init": warmup_init,
            "eps1_mode": eps1_mode,
            "weight_decay_mode": weight_decay_mode,
            "maximize": maximize,
            "impl": impl,
        }
        _check_options("Adafactor", defaults)
        super().__init__(params, defaults)
        guard_param_layout(self, type(self).__name__, "factors each matrix's second moment by rows and columns")
        keep_state_dtype_on_load(self)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its options are checked as the constructor's (a bad group is not added)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            if isinstance(group["eps"], list):
                group["eps"] = tuple(group["eps"])
            _check_options("Adafactor", group)
            for p in group["params"]:
                if torch.is_complex(p):
                    raise ValueError(
                        "adafactor does not support complex parameters: its factored statistics are rows and "
                        "columns of real values; pass torch.view_as_real(p) as a real parameter or use adamw"
                    )
                shard_split("Adafactor", p)  # a layout its sharded statistics cannot take, refused now
        except (ValueError, TypeError, NotImplementedError):
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            # a torch.optim.Adafactor checkpoint: its names for the same options, its algorithm
            if "d" in group and "clip_threshold" not in group:
                group["clip_threshold"] = group.pop("d")
            if "beta2_decay" in group and "decay_rate" not in group:
                group["decay_rate"] = group.pop("beta2_decay")
            group.pop("foreach", None)
            for key, value in _DEFAULTS.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; ``closure`` is called once, with grad enabled."""
        loss = run_closure(closure)
        gens = []
        for group in self.param_groups:
            params, grads, rows, cols, variances, exp_avgs, step_ts = [], [], [], [], [], [], []
            for p in params_with_grad(group, "Adafactor"):
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    dt = matrix_state_dtype(p)
                    if p.ndim >= 2:
                        state["row_var"] = _state_zeros(p, (p.ndim - 1,), dt)
                        state["col_var"] = _state_zeros(p, (p.ndim - 2,), dt)
                    else:
                        state["variance"] = _state_zeros(p, (), dt)
                if group["beta1"] is not None and "exp_avg" not in state:
                    state["exp_avg"] = _state_zeros(p, (), matrix_state_dtype(p))
                step_ts.append(state["step"])
                params.append(p)
                grads.append(p.grad)
                rows.append(state.get("row_var"))
                cols.append(state.get("col_var"))
                variances.append(state.get("variance"))
                exp_avgs.append(state.get("exp_avg") if group["beta1"] is not None else None)
            if step_ts:
                torch._foreach_add_(step_ts, 1)  # the group's step counts (CPU tensors) in one op, as torch does
            steps = [int(s.item()) for s in step_ts]  # CPU tensors: no device sync
            eps1, eps2 = group["eps"]
            gens.append(
                adafactor_rounds(
                    params,
                    grads,
                    rows,
                    cols,
                    variances,
                    exp_avgs,
                    steps,
                    impl=group["impl"],
                    lr=group["lr"],
                    beta1=group["beta1"],
                    beta2=group["beta2"],
                    decay_rate=group["decay_rate"],
                    eps1=eps1,
                    eps2=eps2,
                    clip_threshold=group["clip_threshold"],
                    relative_step=group["relative_step"],
                    scale_parameter=group["scale_parameter"],
                    warmup_init=group["warmup_init"],
                    weight_decay=group["weight_decay"],
                    weight_decay_mode=group["weight_decay_mode"],
                    eps1_mode=group["eps1_mode"],
                    maximize=group["maximize"],
                )
            )
        run_reduction_rounds(gens)  # every group's sharded tensors reduce together
        return loss


register(
    OptimInfo(
        name="adafactor",
        cls=Adafactor,
        default_lr=1e-2,
        description="Adafactor: factored second moment, relative step, update clipping (torch's defaults)",
        paper="Shazeer & Stern, arXiv:1804.04235",
    )
)
# DeepSpeed optimizer.type, matched case-insensitively
register_alias("AdaFactorOptimizer", "adafactor", source="deepspeed")
