"""SOAP: Adam in the eigenbasis of Shampoo's preconditioners (Vyas et al. 2024, arXiv:2409.11321).

Registered as ``soap``. The math lives in plain functions of tensors (:func:`soap_merge_shape`,
:func:`soap_project`, :func:`soap_eigenbasis`, :func:`soap_refresh_eigenbasis`) so a fused kernel
or a sharded wrapper can call it. A step is three phases, composed in :func:`soap_update_`:
:func:`soap_direction` (rotate into the eigenbasis, Adam's moments there, rotate back: whole
matrix), :func:`soap_apply_` (elementwise) and :func:`soap_precondition_` (the preconditioner EMAs
and the periodic eigenbasis refresh: whole matrix).

:func:`soap` steps tensor lists by ``impl``: ``for_loop`` (:func:`soap_update_` per tensor, the
reference) or ``foreach`` (the direction phase for all tensors of one moment shape at once: the
rotations as batched matmuls over stacked bases, Adam's moments and the apply as
``torch._foreach_*`` ops; the preconditioner phase stays per tensor, see :func:`soap`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_opt.optim.base import (
    OptionCheck,
    backfill_group_defaults,
    beta_or_none,
    check_flag,
    check_options,
    check_param_group,
    compute_dtype,
    int_at_least,
    is_number,
    keep_state_dtype_on_load,
    params_with_grad,
    run_closure,
)
from lightning_opt.optim.distributed import (
    Distributed,
    MatrixJob,
    OwnerStateEntry,
    Topology,
    cached_owners,
    check_distributed,
    check_shardable,
    install_owner_state_hooks,
    local,
    owner_compute,
    topology,
)
from lightning_opt.optim.engine import Impl, check_impl, dispatch
from lightning_opt.optim.layout import guard_param_layout
from lightning_opt.optim.precision import LOW_PRECISION
from lightning_opt.optim.registry import OptimInfo, register

__all__ = [
    "SOAP",
    "SOAP_IMPLS",
    "soap",
    "soap_apply_",
    "soap_cost",
    "soap_direction",
    "soap_eigenbasis",
    "soap_layout",
    "soap_merge_shape",
    "soap_precondition_",
    "soap_project",
    "soap_project_stacked",
    "soap_refresh_eigenbasis",
    "soap_update_",
]


def soap_merge_shape(shape: Sequence[int], max_precond_dim: int) -> list[int]:
    """Merge neighbouring dims while their product stays ``<= max_precond_dim`` (the SOAP repo's rule).

    ``(8, 4, 3, 3)`` with 40 becomes ``(32, 9)``; a dim larger than the limit stays alone.
    """
    merged: list[int] = []
    current = 1
    for size in shape:
        if current * size > max_precond_dim:
            if current > 1:
                merged.append(current)
                current = size
            else:
                merged.append(size)
                current = 1
        else:
            current *= size
    if current > 1 or not merged:
        merged.append(current)
    return merged


def soap_layout(
    shape: Sequence[int], *, max_precond_dim: int, merge_dims: bool, precondition_1d: bool
) -> tuple[list[int], list[bool]]:
    """The moments' shape of a parameter of ``shape`` and which of its dims are rotated.

    A 1-D (or 0-D) parameter keeps one dim, rotated only with ``precondition_1d``; a larger one
    is merged (:func:`soap_merge_shape`) with ``merge_dims``; a dim is rotated if it is at most
    ``max_precond_dim``.
    """
    if len(shape) <= 1:
        moments = [max(math.prod(shape), 1)]
        return moments, [precondition_1d and moments[0] <= max_precond_dim]
    moments = soap_merge_shape(shape, max_precond_dim) if merge_dims else list(shape)
    return moments, [size <= max_precond_dim for size in moments]


def soap_cost(shape: Sequence[int], rotated: Sequence[bool], precondition_frequency: int) -> float:
    """Flops of one SOAP step on moments of ``shape`` (the owner-compute cost model).

    Per rotated dim of size ``d`` of a tensor of ``N`` elements: the rotation in and out and the
    preconditioner EMA, three contractions of ``2 N d`` flops; the refresh (a power iteration
    ``L Q``, ``2 d^3``, and a QR, ``~4/3 d^3``) every ``precondition_frequency`` steps.
    """
    n = math.prod(shape)
    return float(sum(6 * n * d + (10 / 3) * d**3 / precondition_frequency for d, r in zip(shape, rotated) if r))


def soap_project(x: Tensor, Q: Sequence[Tensor | None], *, back: bool = False) -> Tensor:
    """Rotate ``x`` into the eigenbasis (``Q_1^T x Q_2`` for a matrix) or, with ``back``, out of it.

    ``Q[i]`` is the orthogonal basis of dim ``i`` or ``None`` for a dim that is not preconditioned.
    Each dim is contracted in turn and moved to the end, so the dim order is restored at the end.
    """
    for q in Q:
        if q is None:
            x = x.movedim(0, -1)
        else:
            x = torch.tensordot(x, q, dims=([0], [1 if back else 0]))
    return x


def soap_eigenbasis(L: Tensor) -> Tensor:
    """Eigenvectors of the symmetric ``L``, by descending eigenvalue (``eigh``; float64 fallback)."""
    eye = torch.eye(L.size(0), dtype=L.dtype, device=L.device)
    try:
        _, q = torch.linalg.eigh(L + 1e-30 * eye)
    except RuntimeError:  # eigh fails to converge on some ill-conditioned float32 inputs
        _, q = torch.linalg.eigh(L.double() + 1e-30 * eye.double())
        q = q.to(L.dtype)
    # row-major: LAPACK returns column-major bases, and a basis restored from a checkpoint into
    # fresh (contiguous) tensors must give the same matmul rounding to resume bitwise
    return q.flip(1).contiguous()


def soap_refresh_eigenbasis(
    GG: Sequence[Tensor | None], Q: Sequence[Tensor | None], exp_avg_sq: Tensor
) -> tuple[list[Tensor | None], Tensor]:
    """One power iteration and QR per preconditioned dim: ``Q <- qr(L Q)`` (the paper's refresh).

    The columns are first sorted by the estimated eigenvalues ``diag(Q^T L Q)`` (descending), and
    ``exp_avg_sq`` is permuted along that dim to follow its coordinates.

    Returns:
        The new bases and the permuted second moment.
    """
    new_Q: list[Tensor | None] = []
    for dim, (L, q) in enumerate(zip(GG, Q)):
        if L is None:
            new_Q.append(None)
            continue
        LQ = L @ q
        order = torch.argsort((q * LQ).sum(dim=0), descending=True)
        exp_avg_sq = exp_avg_sq.index_select(dim, order)
        new_Q.append(torch.linalg.qr(LQ.index_select(1, order))[0].contiguous())  # row-major: see soap_eigenbasis
    return new_Q, exp_avg_sq


def _accumulate_(GG: Sequence[Tensor | None], g: Tensor, shampoo_beta: float) -> None:
    for dim, L in enumerate(GG):
        if L is None:
            continue
        others = [*chain(range(dim), range(dim + 1, g.ndim))]
        L.lerp_(torch.tensordot(g, g, dims=(others, others)), 1 - shampoo_beta)


def soap_direction(
    grad: Tensor,
    state: dict[str, Any],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    normalize_grads: bool,
) -> Tensor:
    """The direction phase of a SOAP step (whole matrix): rotate, update Adam's moments, rotate back.

    ``G' = project(G)``; ``step += 1``; ``m' = lerp(m', G', 1-b1)``; ``v' = b2 v' + (1-b2) G'^2``
    (in place in ``state``); ``N = project_back(m' / (sqrt(v') + eps))``, divided by its RMS with
    ``normalize_grads``.

    Returns:
        ``N`` in the moments' (possibly merged) shape and math dtype, before the lr.
    """
    Q = state["Q"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    g = grad.to(exp_avg.dtype).reshape(exp_avg.shape)
    g_rot = soap_project(g, Q)
    state["step"] += 1
    exp_avg.lerp_(g_rot, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g_rot, g_rot, value=1 - beta2)
    update = soap_project(exp_avg / exp_avg_sq.sqrt().add_(eps), Q, back=True)
    if normalize_grads:
        update.div_(update.square().mean().sqrt().add_(1e-30))
    return update


def soap_apply_(
    param: Tensor,
    update: Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    correct_bias: bool,
) -> None:
    """The elementwise phase of a SOAP step: ``p -= lr sqrt(bc2)/bc1 N``, then ``p -= lr wd p``.

    Without ``correct_bias`` the step is ``lr``. A bf16/fp16 parameter is updated in float32 and
    rounded once.
    """
    dt = compute_dtype(param)
    step_size = lr
    if correct_bias:
        step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    p = param if param.dtype == dt else param.to(dt)
    p.add_(update.reshape(param.shape), alpha=-step_size)
    if weight_decay != 0:
        # after the step, on the updated p (the SOAP repo's order)
        p.mul_(1 - lr * weight_decay)
    if p is not param:
        param.copy_(p)


def soap_precondition_(
    grad: Tensor, state: dict[str, Any], *, shampoo_beta: float, precondition_frequency: int
) -> None:
    """The preconditioner phase of a SOAP step (whole matrix), after :func:`soap_direction`.

    ``L_i <- lerp(L_i, G G^T along dim i, 1 - shampoo_beta)``; every ``precondition_frequency``
    updates the bases are refreshed (:func:`soap_refresh_eigenbasis`) and ``m'`` is rotated along.
    """
    exp_avg = state["exp_avg"]
    g = grad.to(exp_avg.dtype).reshape(exp_avg.shape)
    _accumulate_(state["GG"], g, shampoo_beta)
    if state["step"] % precondition_frequency == 0:
        Q = state["Q"]
        m = soap_project(exp_avg, Q, back=True)
        state["Q"], state["exp_avg_sq"] = soap_refresh_eigenbasis(state["GG"], Q, state["exp_avg_sq"])
        state["exp_avg"] = soap_project(m, state["Q"])


def soap_update_(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    shampoo_beta: float,
    eps: float,
    weight_decay: float,
    precondition_frequency: int,
    normalize_grads: bool,
    correct_bias: bool,
) -> None:
    """One SOAP step for one parameter whose ``state`` was made by :meth:`SOAP._init_state`.

    ``G' = project(G)``; ``m' = lerp(m', G', 1-b1)``; ``v' = b2 v' + (1-b2) G'^2``;
    ``N = project_back(m' / (sqrt(v') + eps))`` (divided by its RMS with ``normalize_grads``);
    ``p -= lr sqrt(bc2)/bc1 N``; ``p -= lr wd p``; then the preconditioners take ``G`` and, every
    ``precondition_frequency`` updates, the bases are refreshed (``m'`` is rotated along with them):
    :func:`soap_direction`, :func:`soap_apply_`, :func:`soap_precondition_`.
    """
    update = soap_direction(grad, state, beta1=beta1, beta2=beta2, eps=eps, normalize_grads=normalize_grads)
    soap_apply_(
        param,
        update,
        step=state["step"],
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        correct_bias=correct_bias,
    )
    soap_precondition_(grad, state, shampoo_beta=shampoo_beta, precondition_frequency=precondition_frequency)


def _soap_for_loop(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], **hp: Any) -> None:
    for p, g, state in zip(params, grads, states):
        soap_update_(p, g, state, **hp)


def soap_project_stacked(x: Tensor, Q: Sequence[Tensor | None], *, back: bool = False) -> Tensor:
    """:func:`soap_project` of each ``x[j]`` by its own bases ``Q[i][j]`` (``x`` and the bases stacked).

    The same contraction order as :func:`soap_project`: each dim in turn is contracted (one
    ``bmm`` over the stack) and moved to the end.
    """
    k = x.size(0)
    for q in Q:
        x = x.movedim(1, -1)
        if q is not None:
            rest = x.shape[1:-1]
            x = torch.bmm(x.reshape(k, -1, q.size(-1)), q.mT if back else q).view(k, *rest, q.size(-1))
    return x


def _soap_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    shampoo_beta: float,
    eps: float,
    weight_decay: float,
    precondition_frequency: int,
    normalize_grads: bool,
    correct_bias: bool,
) -> None:
    # one bucket: one device and parameter dtype, so one math dtype
    dt = states[0]["exp_avg"].dtype
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    # tensors whose moments have one shape and the same rotated dims share one batched rotation
    by_shape: dict[tuple[Any, ...], list[int]] = {}
    for i, s in enumerate(states):
        key = (tuple(s["exp_avg"].shape), tuple(q is None for q in s["Q"]))
        by_shape.setdefault(key, []).append(i)
    rotated: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
    bases: dict[tuple[Any, ...], list[Tensor | None]] = {}
    for key, idx in by_shape.items():
        shape, unrotated = key
        g = [grads[i].to(dt).reshape(shape) for i in idx]
        if all(unrotated):
            # no dim is preconditioned: the rotation is the identity (soap_project only moves dims)
            for i, x in zip(idx, g):
                rotated[i] = x
            continue
        Q = [None if none else torch.stack([states[i]["Q"][d] for i in idx]) for d, none in enumerate(unrotated)]
        bases[key] = Q
        for i, x in zip(idx, soap_project_stacked(torch.stack(g), Q).unbind(0)):
            rotated[i] = x
    for s in states:
        s["step"] += 1
    torch._foreach_lerp_(exp_avgs, rotated, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, rotated, rotated, value=1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    ratios = torch._foreach_div(exp_avgs, denom)
    updates: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
    for key, idx in by_shape.items():
        if key not in bases:
            for i in idx:
                updates[i] = ratios[i]
            continue
        stacked = soap_project_stacked(torch.stack([ratios[i] for i in idx]), bases[key], back=True)
        for i, u in zip(idx, stacked.unbind(0)):
            updates[i] = u
    if normalize_grads:
        norms = torch._foreach_norm(updates)
        # RMS = ||u|| / sqrt(n), as soap_direction's sqrt(mean(u^2)) up to rounding
        torch._foreach_div_(norms, [math.sqrt(u.numel()) for u in updates])
        torch._foreach_add_(norms, 1e-30)
        torch._foreach_div_(updates, norms)
    low = params[0].dtype in LOW_PRECISION
    p32 = [p.to(dt) for p in params] if low else params
    # the step size depends on each tensor's own update count: one foreach call per distinct count
    by_step: dict[int, list[int]] = {}
    for i, s in enumerate(states):
        by_step.setdefault(s["step"], []).append(i)
    for step, idx in by_step.items():
        step_size = lr
        if correct_bias:
            step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        torch._foreach_add_(
            [p32[i] for i in idx], [updates[i].reshape(params[i].shape) for i in idx], alpha=-step_size
        )
    if weight_decay != 0:
        torch._foreach_mul_(p32, 1 - lr * weight_decay)
    if low:
        torch._foreach_copy_(params, p32)
    # the preconditioner phase stays per tensor (the reference's code): the bases are a function of the
    # gradients alone, so they stay identical to for_loop's, including the arbitrary basis eigh and QR
    # pick for a singular preconditioner's null space (rounding differences there are not small)
    for g, s in zip(grads, states):
        soap_precondition_(g, s, shampoo_beta=shampoo_beta, precondition_frequency=precondition_frequency)


#: SOAP's implementations, by ``impl`` name (``for_loop`` is the reference)
SOAP_IMPLS = {"for_loop": _soap_for_loop, "foreach": _soap_foreach}


def soap(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    shampoo_beta: float,
    eps: float,
    weight_decay: float,
    precondition_frequency: int,
    normalize_grads: bool,
    correct_bias: bool,
    impl: str = "auto",
) -> None:
    """SOAP over tensor lists (the functional API): :func:`soap_update_` for every tensor.

    ``states`` are the tensors' state dicts, made by :meth:`SOAP._init_state` (the first step).

    ``impl``: ``"for_loop"`` (one tensor at a time, the reference); ``"foreach"``: the direction
    phase batched: the tensors whose moments share a shape (and rotated dims) are stacked and rotated
    into and out of the eigenbasis by one ``bmm`` per dim, Adam's moments, the weight decay and the
    step are ``torch._foreach_*`` ops over the bucket; the preconditioner EMAs and the refresh
    (:func:`soap_precondition_`) run per tensor as in ``for_loop``, so the bases are bitwise the
    same (a batched ``eigh``/``qr`` may pick other eigenvector signs or another basis of a singular
    preconditioner's null space, which changes the trajectory by more than rounding). ``foreach``
    stacks the bases of same-shaped tensors every step (a transient copy of them). ``"auto"``:
    ``foreach`` on CUDA, ``for_loop`` on the CPU: there ``foreach`` saves Python and launch
    overhead on small matrices (~1.3x on 8 x (64, 64), ~1.6x on 32 x (32, 32) on a loaded 2-core
    AVX2 machine) but nothing measurable on 8 x (256, 256), where the matmuls dominate, and the
    stacked bases cost memory. Buckets by (device, dtype): :func:`lightning_opt.optim.engine.dispatch`.
    """
    dispatch(
        "SOAP",
        "soap",
        impl,
        SOAP_IMPLS,
        {"params": params, "grads": grads, "states": states},
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        shampoo_beta=shampoo_beta,
        eps=eps,
        weight_decay=weight_decay,
        precondition_frequency=precondition_frequency,
        normalize_grads=normalize_grads,
        correct_bias=correct_bias,
    )


def _check(key: str, value: Any, ok: bool, hint: str) -> None:
    if not ok:
        raise ValueError(f"SOAP({key}={value!r}) is invalid; {hint}")


class SOAP(Optimizer):
    """SOAP: Shampoo's eigenbasis, refreshed every ``precondition_frequency`` steps, with Adam inside it.

    For a matrix gradient ``G``, ``L = EMA(G G^T)`` and ``R = EMA(G^T G)`` (decay ``shampoo_beta``)
    give bases ``Q_L, Q_R`` (``eigh`` at the first step, then one power iteration + QR per refresh);
    Adam runs on ``Q_L^T G Q_R`` and its update is rotated back. Higher-dim tensors get one basis per
    dim. The first step of every parameter only initializes the preconditioners and does not move
    it (as in the paper's code); bias correction counts the updates taken after it.

    Args:
        params: parameters or param-group dicts (extra keys such as ``param_names`` pass through).
        lr: learning rate (default ``3e-3``).
        betas: Adam ``(beta1, beta2)`` in the rotated basis (default ``(0.95, 0.95)``).
        shampoo_beta: EMA decay of ``L`` and ``R``; ``None`` (default) uses ``beta2``.
        eps: added to ``sqrt(v')`` (default ``1e-8``).
        weight_decay: decoupled decay ``p -= lr * wd * p``, applied after the update (default ``0.01``).
        precondition_frequency: updates between eigenbasis refreshes (default 10).
        max_precond_dim: dims larger than this are not rotated (default 10000).
        merge_dims: merge neighbouring small dims (conv kernels) up to ``max_precond_dim`` (default
            ``False``); the moments are kept in the merged shape.
        precondition_1d: also rotate 1-D parameters (default ``False``: plain Adam for them).
        normalize_grads: divide the rotated-back update by its RMS (default ``False``).
        correct_bias: Adam bias correction ``sqrt(1-b2^t)/(1-b1^t)`` (default ``True``).
        impl: ``"auto"`` (default: ``foreach`` on CUDA, ``for_loop`` on the CPU), ``"for_loop"``
            (one tensor at a time, the reference) or ``"foreach"`` (the rotations of same-shaped
            tensors batched, the elementwise part as ``torch._foreach_*`` ops; equal to
            ``for_loop`` up to rounding, see :func:`soap`). Keyword-only.
        distributed: ``"auto"`` (default) or ``"local"``. With ``"auto"``, on FSDP2 shards
            (``fully_shard``) and under DDP (a process group of more than one rank) each rotated
            tensor is stepped whole on one owning rank (:mod:`lightning_opt.optim.distributed`:
            its gradient's rows are sent there, the update's rows sent back), and its
            preconditioners, eigenbases and moments live on that owner; ``state_dict()`` presents
            them sharded by rows (FSDP2) or replicated (DDP) and is then a collective (call it on every
            rank, as Lightning and ``torch.distributed.checkpoint`` do). Unrotated tensors stay
            local. ``"local"``: every process steps its own tensors alone (refused for shards).
            Keyword-only.

    Raises:
        ValueError: invalid lr, betas, shampoo_beta, eps, weight_decay, precondition_frequency,
            max_precond_dim, impl or distributed; a flag that is not a bool; a DTensor with
            ``distributed="local"``.
        NotImplementedError: a DTensor that is not FSDP2's ``Shard(0)`` on a 1-D mesh.

    Example:
        >>> opt = SOAP(model.parameters(), lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01)

    Differences from the references, each equal in exact arithmetic or a documented choice: the
    first moment is kept in the rotated basis and rotated along at each refresh (the SOAP repo's
    current code; ``pytorch_optimizer.SOAP`` keeps it unrotated); the refresh QR runs in the
    parameter's math dtype (float64 for float64 parameters) where both references use float32;
    ``normalize_grads`` divides by ``RMS + 1e-30`` as the SOAP repo does (``pytorch_optimizer``
    adds ``eps``); the bias correction counts each parameter's own updates (the SOAP repo's
    per-parameter step; ``pytorch_optimizer`` counts group steps, the same when every parameter gets
    a gradient every step); ``data_format`` is channels-first only. The moments and preconditioners of
    bf16/fp16 parameters are float32. Paper: Vyas et al., "SOAP: Improving and Stabilizing Shampoo
    using Adam", arXiv:2409.11321.
    """

    #: the ``impl`` values this class takes besides ``"auto"`` (the contract suite runs each)
    impls: ClassVar[tuple[str, ...]] = tuple(SOAP_IMPLS)
    #: eigenbases of per-tensor statistics have no complex form here (base.reject_complex)
    supports_complex: ClassVar[bool] = False
    #: group options with their own checks (base.check_options: the constructor's and each group's)
    option_checks: ClassVar[dict[str, OptionCheck]] = {
        "shampoo_beta": beta_or_none,
        "precondition_frequency": int_at_least(1),
        "max_precond_dim": int_at_least(1),
    }

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        correct_bias: bool = True,
        *,
        impl: Impl = "auto",
        distributed: Distributed = "auto",
    ) -> None:
        _check("lr", lr, is_number(lr) and lr >= 0, "lr must be a finite number >= 0")
        _check(
            "betas", betas,
            isinstance(betas, (tuple, list)) and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas),
            "expected two floats in [0, 1)",
        )
        _check("eps", eps, is_number(eps) and eps >= 0, "it must be a finite number >= 0")
        _check(
            "weight_decay",
            weight_decay,
            is_number(weight_decay) and weight_decay >= 0,
            "it must be a finite number >= 0",
        )
        defaults = {
            "lr": lr,
            "betas": tuple(float(b) for b in betas),
            "shampoo_beta": shampoo_beta,
            "eps": eps,
            "weight_decay": weight_decay,
            "precondition_frequency": precondition_frequency,
            "max_precond_dim": max_precond_dim,
            "merge_dims": check_flag("SOAP", "merge_dims", merge_dims),
            "precondition_1d": check_flag("SOAP", "precondition_1d", precondition_1d),
            "normalize_grads": check_flag("SOAP", "normalize_grads", normalize_grads),
            "correct_bias": check_flag("SOAP", "correct_bias", correct_bias),
            "impl": check_impl("SOAP", impl, tuple(SOAP_IMPLS)),
            "distributed": check_distributed("SOAP", distributed),
        }
        # shampoo_beta, precondition_frequency, max_precond_dim: the checks every group's own get
        defaults = check_options("SOAP", defaults, impls=SOAP_IMPLS, checks=self.option_checks)
        super().__init__(params, defaults)
        guard_param_layout(self, type(self).__name__, "preconditions each whole matrix in its eigenbasis")
        keep_state_dtype_on_load(self)
        install_owner_state_hooks(self, self._owner_state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        backfill_group_defaults(self, impl="auto", distributed="auto")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; an invalid ``impl`` and DTensor (sharded) parameters are refused here, before any step."""
        # its own options checked as the constructor's, before adding: a refused group must not stay
        param_group = check_param_group(self, param_group)
        if "distributed" in param_group:
            check_distributed("SOAP", param_group["distributed"])
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        names = group.get("param_names") or [None] * len(group["params"])
        for p, name in zip(group["params"], names):
            check_shardable("SOAP", p, name, distributed=group["distributed"])

    @staticmethod
    def _layout(shape: Sequence[int], group: dict[str, Any]) -> tuple[list[int], list[bool]]:
        return soap_layout(
            shape,
            max_precond_dim=group["max_precond_dim"],
            merge_dims=group["merge_dims"],
            precondition_1d=group["precondition_1d"],
        )

    @staticmethod
    def _init_state(param: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        dt = compute_dtype(param)
        shape, rotated = SOAP._layout(param.shape, group)
        state["step"] = 0
        state["exp_avg"] = torch.zeros(shape, dtype=dt, device=param.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=dt, device=param.device)
        state["GG"] = [torch.zeros(n, n, dtype=dt, device=param.device) if r else None for n, r in zip(shape, rotated)]
        beta2 = group["betas"][1]
        shampoo_beta = beta2 if group["shampoo_beta"] is None else group["shampoo_beta"]
        _accumulate_(state["GG"], grad.to(dt).reshape(shape), shampoo_beta)
        state["Q"] = [None if L is None else soap_eigenbasis(L) for L in state["GG"]]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; ``closure`` (re-evaluating the loss) is called once, with grad enabled."""
        loss = run_closure(closure)
        topo, owners = self._topology_and_owners()
        shared = []  # (group, param) of the rotated tensors stepped by their owners
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            shampoo_beta = beta2 if group["shampoo_beta"] is None else group["shampoo_beta"]
            params, grads, states = [], [], []
            for p in params_with_grad(group, "SOAP"):
                state = self.state[p]
                if id(p) in owners:
                    shared.append((group, p))
                    continue
                if topo.mode == "fsdp" and group["distributed"] == "auto":
                    # an unrotated shard: elementwise Adam on this rank's rows, state sharded like p
                    self._local_shard_step(p, group, state)
                    continue
                if "Q" not in state:
                    # the first step only builds the preconditioners (no update), as in the paper's code
                    self._init_state(p, p.grad, group, state)
                    continue
                params.append(p)
                grads.append(p.grad)
                states.append(state)
            soap(
                params,
                grads,
                states,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                shampoo_beta=shampoo_beta,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                precondition_frequency=group["precondition_frequency"],
                normalize_grads=group["normalize_grads"],
                correct_bias=group["correct_bias"],
                impl=group["impl"],
            )
        if shared:
            self._owner_step(topo, owners, shared)
        return loss

    # --- FSDP2 shards and DDP replicas (lightning_opt.optim.distributed) ------------------------

    def _topology_and_owners(self) -> tuple[Topology, dict[int, int]]:
        """The step's topology and the owner of every rotated tensor of a ``distributed="auto"`` group.

        The owners cover every such parameter (with a gradient or not) and are cached while the
        parameters and the world size stay the same: their state lives there.
        """
        auto = [(g, p) for g in self.param_groups if g["distributed"] == "auto" for p in g["params"]]
        topo = topology([p for _, p in auto])
        if topo.mode == "single":
            return topo, {}
        rotated = []
        for group, p in auto:
            shape, rot = self._layout(p.shape, group)
            if any(rot):
                rotated.append((p, tuple(shape), soap_cost(shape, rot, group["precondition_frequency"])))
        return topo, cached_owners(self, topo, rotated)

    def _owner_state(self) -> tuple[Topology, list[OwnerStateEntry]]:
        topo, owners = self._topology_and_owners()
        entries = []
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in owners or "step" not in self.state.get(p, {}):
                    continue
                shape, rotated = self._layout(p.shape, group)
                pre = [(n, n) if r else None for n, r in zip(shape, rotated)]
                layout = {"exp_avg": tuple(shape), "exp_avg_sq": tuple(shape), "GG": pre, "Q": list(pre)}
                entries.append(OwnerStateEntry(p, owners[id(p)], layout, compute_dtype(p), local(p).device))
        return topo, entries

    def _local_shard_step(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        # no rotated dim: SOAP is Adam, elementwise; the moments are DTensors sharded like p (and
        # the moments' shape is p's: merging only joins dims that are then rotated)
        shape, _ = self._layout(p.shape, group)
        if "step" not in state:  # the first step only builds the (empty) preconditioners
            state["step"] = 0
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = torch.zeros_like(p, dtype=compute_dtype(p), memory_format=torch.contiguous_format)
            state["GG"] = [None] * len(shape)
            state["Q"] = [None] * len(shape)
            return
        beta1, beta2 = group["betas"]
        view = {**state, "exp_avg": local(state["exp_avg"]), "exp_avg_sq": local(state["exp_avg_sq"])}
        soap_update_(
            local(p),
            local(p.grad),
            view,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            shampoo_beta=beta2 if group["shampoo_beta"] is None else group["shampoo_beta"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            precondition_frequency=group["precondition_frequency"],
            normalize_grads=group["normalize_grads"],
            correct_bias=group["correct_bias"],
        )
        state["step"] = view["step"]
        for key in ("exp_avg", "exp_avg_sq"):  # the refresh re-binds them (views of the same storage)
            if view[key] is not local(state[key]):
                local(state[key]).copy_(view[key].reshape(local(state[key]).shape))

    def _owner_step(
        self, topo: Topology, owners: dict[int, int], shared: list[tuple[dict[str, Any], Tensor]]
    ) -> None:
        """Step the rotated tensors: each whole on its owner (:func:`soap_direction` and
        :func:`soap_precondition_`, or the first step's :meth:`_init_state`), :func:`soap_apply_`
        on every rank's rows."""
        jobs, applies = [], []
        for group, p in shared:
            state = self.state[p]
            owner = owners[id(p)]
            first = "step" not in state
            if first:
                state["step"] = 0  # every rank counts the steps; the owner's _init_state sets it too
            elif owner != topo.rank:
                state["step"] += 1  # on the owner soap_direction counts
            beta1, beta2 = group["betas"]
            hp = {"beta1": beta1, "beta2": beta2, "eps": group["eps"], "normalize_grads": group["normalize_grads"]}
            pre = {
                "shampoo_beta": beta2 if group["shampoo_beta"] is None else group["shampoo_beta"],
                "precondition_frequency": group["precondition_frequency"],
            }

            def compute(
                full: list[Tensor], state=state, group=group, first=first, hp=hp, pre=pre
            ) -> list[Tensor]:
                g = full[0]
                if first:
                    # the whole gradient in the math dtype stands in for the parameter (shape, dtype, device)
                    SOAP._init_state(g, g, group, state)
                    return []
                update = soap_direction(g, state, **hp)
                soap_precondition_(g, state, **pre)
                return [update.reshape(g.shape)]

            grad = local(p.grad).to(compute_dtype(p))
            jobs.append(MatrixJob(owner, [grad], p.shape[0], [] if first else [tuple(p.shape)], compute))
            applies.append((group, p, first))
        for (group, p, first), outputs in zip(applies, owner_compute(topo, jobs)):
            if first:
                continue
            beta1, beta2 = group["betas"]
            soap_apply_(
                local(p),
                outputs[0],
                step=self.state[p]["step"],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                correct_bias=group["correct_bias"],
            )


register(
    OptimInfo(
        name="soap",
        cls=SOAP,
        description="SOAP: Adam in the eigenbasis of Shampoo's preconditioners",
        paper="Vyas et al., arXiv:2409.11321",
        default_lr=3e-3,
    )
)
