"""Shampoo with the parts that make it practical: blocking, grafting, stale epsilon-regularized roots.

Shampoo (Gupta, Koren & Singer 2018, arXiv:1802.09568) preconditions a matrix gradient ``G`` by
Kronecker factors of its second moment, ``L^(-1/4) G R^(-1/4)`` with ``L = sum G G^T`` and
``R = sum G^T G``; an order-``k`` tensor gets one factor per dim and roots ``-1/(2k)``. What makes it
work in practice is taken from Meta's Distributed Shampoo (Shi et al. 2023, arXiv:2309.06497, the
AlgoPerf winner): the roots are recomputed only every ``precondition_frequency`` steps
(eigendecomposition, epsilon-regularized, in float32 or float64), large dims are split into blocks of
at most ``max_preconditioner_dim`` (each block preconditioned on its own), the Shampoo direction of
each block is rescaled to the norm of a diagonal method's ("grafting": Adam, AdaGrad, RMSProp or
SGD), the grafting method alone runs until ``start_preconditioning_step``, and the first moment is an
EMA of the gradient (``beta1``) with SGD momentum / Nesterov and decoupled weight decay on top.

Registered as ``shampoo``. The math lives in plain functions of tensors. A step is three phases,
composed in :func:`shampoo_update_`: :func:`shampoo_precondition_` (the step count, the factor
statistics and the periodic inverse roots: whole blocks), :func:`shampoo_direction` (the grafting
statistics, the filtered gradient, the blocked preconditioning and the grafting rescale: whole
blocks) and :func:`shampoo_apply_` (decoupled weight decay, momentum / Nesterov on the direction and
the step: elementwise, so it can run on a local shard). Shampoo's momentum acts on the preconditioned
direction (Meta's order), so it is part of the elementwise apply phase, not a phase before the
direction as Muon's is.

On FSDP2 shards and DDP replicas (``distributed="auto"``), every preconditioned tensor is stepped
whole by one owning rank through :mod:`lightning_opt.optim.distributed` (owners by cost,
:func:`shampoo_cost`; rows exchanged with ``all_to_all_single``, or broadcast under DDP): the owner
gathers the gradient and parameter rows, runs :func:`shampoo_update_` on them and each rank takes
its rows of the result, so the run equals one process's bit for bit; the owner holds the tensor's
state (portable checkpoints: row-sharded DTensors). Diagonal (1-D) parameters step their own shards.

:func:`shampoo` steps tensor lists by ``impl``: ``for_loop`` (:func:`shampoo_update_` per tensor, the
reference) or ``foreach`` (the elementwise parts as ``torch._foreach_*`` ops and the blocks of one
shape preconditioned by batched matmuls; the statistics and roots stay per tensor, see :func:`shampoo`).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_opt.optim.base import (
    OptionCheck,
    backfill_group_defaults,
    check_arg,
    check_flag,
    check_options,
    check_param_group,
    compute_dtype,
    is_int,
    is_number,
    keep_state_dtype_on_load,
    params_with_grad,
    reject_complex,
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
from lightning_opt.optim.engine import Impl, dispatch
from lightning_opt.optim.layout import guard_param_layout
from lightning_opt.optim.precision import LOW_PRECISION
from lightning_opt.optim.registry import OptimInfo, register
from lightning_opt.optim.soap import soap_merge_shape, soap_project, soap_project_stacked

__all__ = [
    "GRAFTINGS",
    "SHAMPOO_IMPLS",
    "Grafting",
    "Shampoo",
    "shampoo",
    "shampoo_apply_",
    "shampoo_cost",
    "shampoo_direction",
    "shampoo_init_state_",
    "shampoo_inverse_root",
    "shampoo_layout",
    "shampoo_precondition_",
    "shampoo_update_",
]

#: The grafting methods: the diagonal method whose per-block update norm the Shampoo direction takes
Grafting = Literal["adam", "adagrad", "rmsprop", "sgd", "none"]
GRAFTINGS: tuple[str, ...] = get_args(Grafting)
RootDtype = Literal["float32", "float64"]
_ROOT_DTYPES = {None: None, "float32": torch.float32, "float64": torch.float64}

#: (merged shape, blocks as tuples of slices) of a preconditioned tensor; ``None``: diagonal only
Layout = tuple[tuple[int, ...], tuple[tuple[slice, ...], ...]] | None


@functools.lru_cache(maxsize=4096)
def shampoo_layout(
    shape: tuple[int, ...], max_preconditioner_dim: int, merge_dims: bool, precondition_1d: bool
) -> Layout:
    """How a parameter of ``shape`` is preconditioned: its (merged) shape and its blocks, or ``None``.

    ``None`` (diagonal: the grafting method's update alone) for 0-D/1-D parameters unless
    ``precondition_1d``, and for empty ones. Otherwise the shape is kept, or with ``merge_dims``
    neighbouring dims are merged while their product stays ``<= max_preconditioner_dim`` (dims of
    size 1 disappear; Meta's ``merge_small_dims``); a 0-D parameter is ``(1,)``. Every dim is then
    split into chunks of ``max_preconditioner_dim`` (the last one shorter) and each combination of
    chunks is one block (Meta's ``multi_dim_split``), dim 0 outermost.
    """
    if math.prod(shape) == 0 or (len(shape) <= 1 and not precondition_1d):
        return None
    if not shape:
        merged: tuple[int, ...] = (1,)
    elif merge_dims:
        merged = tuple(soap_merge_shape(shape, max_preconditioner_dim))
    else:
        merged = tuple(shape)
    chunks = [
        [slice(start, min(start + max_preconditioner_dim, n)) for start in range(0, n, max_preconditioner_dim)]
        for n in merged
    ]
    return merged, tuple(itertools.product(*chunks))


def shampoo_cost(layout: Layout, precondition_frequency: int) -> float:
    """Flops of one Shampoo step of a preconditioned tensor (the owner-compute cost model).

    Per block of ``N`` elements and dim of size ``d``: the factor update and the preconditioning,
    two contractions of ``2 N d`` flops; the eigendecomposition and the root (``~10 d^3``) every
    ``precondition_frequency`` steps.
    """
    if layout is None:
        return 0.0
    total = 0.0
    for block in layout[1]:
        dims = _block_dims(block)
        n = math.prod(dims)
        total += sum(4 * n * d + 10 * d**3 / precondition_frequency for d in dims)
    return total


def _block_dims(block: tuple[slice, ...]) -> list[int]:
    return [s.stop - s.start for s in block]


def _per_block(blocks: Sequence[tuple[slice, ...]], flat: Sequence[Tensor]) -> list[Sequence[Tensor]]:
    """A flat per-dim list (``factors``, ``roots``) cut into one list per block."""
    out, offset = [], 0
    for block in blocks:
        out.append(flat[offset : offset + len(block)])
        offset += len(block)
    return out


def shampoo_inverse_root(
    factor: Tensor, *, root: int, epsilon: float, bias_correction: float = 1.0, dtype: torch.dtype | None = None
) -> Tensor:
    """``(F / bias_correction + epsilon I)^(-1/root)`` by eigendecomposition, returned in ``F``'s dtype.

    The decomposition runs in ``dtype`` (default ``F``'s; retried in float64 if it fails to
    converge). As in Meta's ``matrix_inverse_root``: the eigenvalues are first shifted up by
    ``-min(lambda_min, 0)`` (a rounding-negative PSD matrix becomes PSD), then ``epsilon`` is added.

    Raises:
        RuntimeError: ``F`` holds inf or NaN (the gradients were not finite).
    """
    dt = dtype or factor.dtype
    A = factor.to(dt)
    if bias_correction != 1.0:
        A = A / bias_correction
    if not bool(torch.isfinite(A).all()):
        raise RuntimeError(
            "Shampoo: a preconditioner statistic is not finite (inf/NaN gradients reached the optimizer); "
            "lower the lr, clip gradients or use a GradScaler, which skips such steps"
        )
    try:
        lam, Q = torch.linalg.eigh(A)
    except RuntimeError:  # eigh fails to converge on some ill-conditioned float32 inputs
        if dt == torch.float64:
            raise
        lam, Q = torch.linalg.eigh(A.double())
    lam = lam - lam.min().clamp(max=0)
    lam = lam + epsilon
    return ((Q * lam.pow(-1.0 / root).unsqueeze(0)) @ Q.mT).to(factor.dtype)


def _root_due(step: int, precondition_frequency: int, start: int) -> bool:
    # Meta's rule: at the start step, then at every multiple of the frequency after it
    return step == start or (step > start and step % precondition_frequency == 0)


def shampoo_init_state_(
    param: Tensor,
    state: dict[str, Any],
    *,
    layout: Layout,
    grafting: str,
    beta1: float,
    momentum: float,
) -> None:
    """Create the state a step needs that ``state`` lacks (the first step, or an option turned on later).

    ``step``; per block and dim a factor matrix (zeros) and its inverse root (identity) in the math
    dtype, as two flat lists (``factors``, ``roots``: block by block, dim by dim); ``graft_sq`` (the
    grafting method's second moment, like the parameter) for adam / adagrad
    / rmsprop; ``filtered_grad`` with ``beta1 > 0``; ``momentum_buffer`` with ``momentum > 0``.

    Raises:
        RuntimeError: the saved preconditioners do not fit ``layout`` (a checkpoint loaded with
            another ``max_preconditioner_dim``, ``merge_dims`` or ``precondition_1d``).
    """
    dt = compute_dtype(param)
    dev = param.device
    if "step" not in state:
        state["step"] = 0
        if layout is not None:
            dims = [n for b in layout[1] for n in _block_dims(b)]
            state["factors"] = [torch.zeros(n, n, dtype=dt, device=dev) for n in dims]
            state["roots"] = [torch.eye(n, dtype=dt, device=dev) for n in dims]
    have = [tuple(F.shape) for F in state.get("factors", [])]
    want = [] if layout is None else [(n, n) for b in layout[1] for n in _block_dims(b)]
    if have != want:
        raise RuntimeError(
            f"Shampoo: the saved preconditioners of a parameter of shape {tuple(param.shape)} do not fit its "
            "layout under the group's max_preconditioner_dim / merge_dims / precondition_1d; load the checkpoint "
            "with the options it was made with"
        )
    if grafting in ("adam", "adagrad", "rmsprop") and "graft_sq" not in state:
        state["graft_sq"] = torch.zeros(param.shape, dtype=dt, device=dev)
    if beta1 > 0 and "filtered_grad" not in state:
        state["filtered_grad"] = torch.zeros(param.shape, dtype=dt, device=dev)
    if momentum > 0 and "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros(param.shape, dtype=dt, device=dev)


def _accumulate_(factors: Sequence[Tensor], block: Tensor, beta2: float | None) -> None:
    order = block.ndim
    for k, F in enumerate(factors):
        others = [*range(k), *range(k + 1, order)]
        outer = torch.tensordot(block, block, dims=(others, others))
        if beta2 is None:
            F.add_(outer)
        else:
            F.mul_(beta2).add_(outer, alpha=1 - beta2)


def shampoo_precondition_(
    grad: Tensor,
    state: dict[str, Any],
    *,
    layout: Layout,
    beta2: float | None,
    epsilon: float,
    precondition_frequency: int,
    start_preconditioning_step: int,
    inv_root_override: int,
    use_bias_correction: bool,
    root_dtype: torch.dtype | None,
) -> None:
    """The preconditioner phase (whole blocks): ``step += 1``, the factor statistics, the due roots.

    For every block ``B`` (of ``grad`` in the math dtype, coupled weight decay already added) and
    dim ``k``: ``F_k <- beta2 F_k + (1 - beta2) B_(k) B_(k)^T`` (``B_(k)``: ``B`` unfolded along
    ``k``), or ``F_k += B_(k) B_(k)^T`` with ``beta2=None``. At ``start_preconditioning_step`` and
    at every multiple of ``precondition_frequency`` after it, ``X_k = (F_k / (1 - beta2^t) +
    epsilon I)^(-1/r)`` (:func:`shampoo_inverse_root`; the bias correction with ``beta2 < 1`` and
    ``use_bias_correction``), ``r = inv_root_override`` or ``2 * order`` of the block.
    """
    state["step"] += 1
    if layout is None:
        return
    merged, blocks = layout
    g = grad.reshape(merged)
    factors, offset = state["factors"], 0
    for block in blocks:
        _accumulate_(factors[offset : offset + len(block)], g[block], beta2)
        offset += len(block)
    step = state["step"]
    if not _root_due(step, precondition_frequency, start_preconditioning_step):
        return
    bc = 1 - beta2**step if (beta2 is not None and use_bias_correction) else 1.0
    roots, offset = state["roots"], 0
    for block in blocks:
        root = inv_root_override or 2 * len(block)
        for k in range(offset, offset + len(block)):
            roots[k] = shampoo_inverse_root(
                factors[k], root=root, epsilon=epsilon, bias_correction=bc, dtype=root_dtype
            )
        offset += len(block)


def _graft_direction(
    ghat: Tensor, state: dict[str, Any], *, grafting: str, grafting_beta2: float, grafting_epsilon: float
) -> Tensor:
    if grafting in ("sgd", "none"):
        return ghat
    v = state["graft_sq"]
    if grafting == "adam":
        v = v / (1 - grafting_beta2 ** state["step"])
    return ghat / v.sqrt().add_(grafting_epsilon)


def shampoo_direction(
    grad: Tensor,
    state: dict[str, Any],
    *,
    layout: Layout,
    beta1: float,
    use_bias_correction: bool,
    grafting: str,
    grafting_beta2: float,
    grafting_epsilon: float,
    start_preconditioning_step: int,
) -> Tensor:
    """The direction phase (whole blocks), after :func:`shampoo_precondition_`.

    Grafting statistics of ``G`` (``grad`` in the math dtype): adagrad ``V += G^2``, adam / rmsprop
    ``V <- b V + (1 - b) G^2`` (``b = grafting_beta2``). The filtered gradient ``Gf = lerp(M, G,
    1 - beta1)`` (in place in ``state``), divided by ``1 - beta1^t`` with ``use_bias_correction``
    (``G`` itself with ``beta1 = 0``). The grafting direction ``P_g``: ``Gf / (sqrt(V / (1 - b^t)) +
    eps_g)`` (adam), ``Gf / (sqrt(V) + eps_g)`` (adagrad, rmsprop), ``Gf`` (sgd, none). Before
    ``start_preconditioning_step`` and for diagonal parameters the direction is ``P_g``; otherwise
    each block is ``P = Gf x_1 X_1 ... x_k X_k`` (mode products with the inverse roots), rescaled
    (unless ``grafting="none"``) to ``P ||P_g|| / (||P|| + 1e-16)`` over the block.

    Returns:
        The direction in the parameter's shape and math dtype (may share memory with ``grad`` or
        ``state``: read it, do not modify it in place).
    """
    dt = grad.dtype
    if grafting == "adagrad":
        state["graft_sq"].addcmul_(grad, grad)
    elif grafting in ("adam", "rmsprop"):
        state["graft_sq"].mul_(grafting_beta2).addcmul_(grad, grad, value=1 - grafting_beta2)
    ghat = grad
    if beta1 > 0:
        m = state["filtered_grad"]
        m.lerp_(grad, 1 - beta1)
        ghat = m / (1 - beta1 ** state["step"]) if use_bias_correction else m
    pg = _graft_direction(
        ghat, state, grafting=grafting, grafting_beta2=grafting_beta2, grafting_epsilon=grafting_epsilon
    )
    if layout is None or state["step"] < start_preconditioning_step:
        return pg
    merged, blocks = layout
    gh, gd = ghat.reshape(merged), pg.reshape(merged)
    out = torch.empty(merged, dtype=dt, device=grad.device)
    for block, roots in zip(blocks, _per_block(blocks, state["roots"])):
        p = soap_project(gh[block], roots)
        if grafting != "none":
            p.mul_(torch.linalg.vector_norm(gd[block]) / (torch.linalg.vector_norm(p) + 1e-16))
        out[block] = p
    return out.reshape(grad.shape)


def shampoo_apply_(
    param: Tensor,
    direction: Tensor,
    state: dict[str, Any],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    use_nesterov: bool,
) -> None:
    """The elementwise phase: ``P += wd p`` (decoupled decay; pass 0 when coupled), momentum, the step.

    ``B <- momentum B + P``; ``P <- P + momentum B`` (Nesterov) or ``P <- B``; ``p -= lr P``
    (Meta's order: the decay enters the momentum). A bf16/fp16 parameter is updated in float32 and
    rounded once. ``direction`` is not modified.
    """
    dt = compute_dtype(param)
    p = param if param.dtype == dt else param.to(dt)
    u = direction
    if weight_decay != 0:
        u = u.add(p, alpha=weight_decay)
    if momentum != 0:
        buf = state["momentum_buffer"]
        buf.mul_(momentum).add_(u)
        u = u.add(buf, alpha=momentum) if use_nesterov else buf
    p.add_(u, alpha=-lr)
    if p is not param:
        param.copy_(p)


def _with_coupled_decay(g: Tensor, param: Tensor, weight_decay: float, decoupled: bool) -> Tensor:
    if weight_decay == 0 or decoupled:
        return g
    return g.add(param.to(g.dtype), alpha=weight_decay)


def shampoo_update_(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    *,
    lr: float,
    beta1: float,
    beta2: float | None,
    epsilon: float,
    momentum: float,
    weight_decay: float,
    max_preconditioner_dim: int,
    precondition_frequency: int,
    start_preconditioning_step: int,
    inv_root_override: int,
    use_nesterov: bool,
    use_bias_correction: bool,
    use_decoupled_weight_decay: bool,
    grafting: str,
    grafting_beta2: float,
    grafting_epsilon: float,
    merge_dims: bool,
    precondition_1d: bool,
    root_dtype: torch.dtype | None,
) -> None:
    """One Shampoo step for one parameter whose ``state`` was made by :func:`shampoo_init_state_`.

    ``G = grad (+ wd p unless decoupled)``; :func:`shampoo_precondition_`,
    :func:`shampoo_direction`, :func:`shampoo_apply_` (with ``wd`` when decoupled).
    """
    layout = shampoo_layout(tuple(param.shape), max_preconditioner_dim, merge_dims, precondition_1d)
    g = _with_coupled_decay(grad.to(compute_dtype(param)), param, weight_decay, use_decoupled_weight_decay)
    shampoo_precondition_(
        g,
        state,
        layout=layout,
        beta2=beta2,
        epsilon=epsilon,
        precondition_frequency=precondition_frequency,
        start_preconditioning_step=start_preconditioning_step,
        inv_root_override=inv_root_override,
        use_bias_correction=use_bias_correction,
        root_dtype=root_dtype,
    )
    direction = shampoo_direction(
        g,
        state,
        layout=layout,
        beta1=beta1,
        use_bias_correction=use_bias_correction,
        grafting=grafting,
        grafting_beta2=grafting_beta2,
        grafting_epsilon=grafting_epsilon,
        start_preconditioning_step=start_preconditioning_step,
    )
    shampoo_apply_(
        param,
        direction,
        state,
        lr=lr,
        weight_decay=weight_decay if use_decoupled_weight_decay else 0.0,
        momentum=momentum,
        use_nesterov=use_nesterov,
    )


def _shampoo_for_loop(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], **hp: Any) -> None:
    for p, g, state in zip(params, grads, states):
        shampoo_update_(p, g, state, **hp)


def _shampoo_foreach(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], **hp: Any
) -> None:
    # the keyword arguments of shampoo_update_ (the same for every impl)
    lr, beta1, momentum, weight_decay = hp["lr"], hp["beta1"], hp["momentum"], hp["weight_decay"]
    start_preconditioning_step, grafting = hp["start_preconditioning_step"], hp["grafting"]
    grafting_beta2, grafting_epsilon = hp["grafting_beta2"], hp["grafting_epsilon"]
    use_bias_correction, use_decoupled_weight_decay = hp["use_bias_correction"], hp["use_decoupled_weight_decay"]
    max_preconditioner_dim, merge_dims, precondition_1d = (
        hp["max_preconditioner_dim"], hp["merge_dims"], hp["precondition_1d"]
    )
    # one bucket: one device and parameter dtype, so one math dtype
    dt = compute_dtype(params[0])
    low = params[0].dtype in LOW_PRECISION
    p32 = [p.to(dt) for p in params] if low else params
    g = [gr.to(dt) for gr in grads]
    if weight_decay != 0 and not use_decoupled_weight_decay:
        g = torch._foreach_add(g, p32, alpha=weight_decay)
    layouts = [shampoo_layout(tuple(p.shape), max_preconditioner_dim, merge_dims, precondition_1d) for p in params]
    # the statistics and roots stay per tensor (as for_loop): eigh is the costly part and a batched
    # eigh may round differently, which the roots' -1/r powers of small eigenvalues would amplify
    for gi, s, layout in zip(g, states, layouts):
        shampoo_precondition_(
            gi,
            s,
            layout=layout,
            beta2=hp["beta2"],
            epsilon=hp["epsilon"],
            precondition_frequency=hp["precondition_frequency"],
            start_preconditioning_step=start_preconditioning_step,
            inv_root_override=hp["inv_root_override"],
            use_bias_correction=use_bias_correction,
            root_dtype=hp["root_dtype"],
        )
    steps = [s["step"] for s in states]
    if grafting != "sgd" and grafting != "none":
        sq = [s["graft_sq"] for s in states]
        if grafting == "adagrad":
            torch._foreach_addcmul_(sq, g, g)
        else:
            torch._foreach_mul_(sq, grafting_beta2)
            torch._foreach_addcmul_(sq, g, g, value=1 - grafting_beta2)
    ghat = g
    if beta1 > 0:
        m = [s["filtered_grad"] for s in states]
        torch._foreach_lerp_(m, g, 1 - beta1)
        ghat = torch._foreach_div(m, [1 - beta1**t for t in steps]) if use_bias_correction else m
    if grafting in ("sgd", "none"):
        pg = list(ghat)
    else:
        if grafting == "adam":
            denom = torch._foreach_div(sq, [1 - grafting_beta2**t for t in steps])
            torch._foreach_sqrt_(denom)
        else:
            denom = torch._foreach_sqrt(sq)
        torch._foreach_add_(denom, grafting_epsilon)
        pg = list(torch._foreach_div(ghat, denom))
    directions = list(pg)
    # the preconditioned blocks of every tensor, bucketed by block shape: one batched chain per shape
    by_shape: dict[tuple[int, ...], list[tuple[int, tuple[slice, ...], list[Tensor]]]] = {}
    outs: dict[int, Tensor] = {}
    for i, (layout, s) in enumerate(zip(layouts, states)):
        if layout is None or s["step"] < start_preconditioning_step:
            continue
        merged, blocks = layout
        outs[i] = torch.empty(merged, dtype=dt, device=params[i].device)
        for block, roots in zip(blocks, _per_block(blocks, s["roots"])):
            by_shape.setdefault(tuple(_block_dims(block)), []).append((i, block, roots))
    for shape, items in by_shape.items():
        x = torch.stack([ghat[i].reshape(outs[i].shape)[block] for i, block, _ in items])
        Q = [torch.stack([roots[d] for _, _, roots in items]) for d in range(len(shape))]
        pre = soap_project_stacked(x, Q)
        if grafting != "none":
            gnorms = torch.stack(
                torch._foreach_norm([pg[i].reshape(outs[i].shape)[block] for i, block, _ in items])
            )
            pnorms = torch.linalg.vector_norm(pre.reshape(len(items), -1), dim=1)
            pre = pre * (gnorms / (pnorms + 1e-16)).view(-1, *([1] * len(shape)))
        for (i, block, _), p in zip(items, pre.unbind(0)):
            outs[i][block] = p
    for i, out in outs.items():
        directions[i] = out.reshape(params[i].shape)
    u = directions
    if weight_decay != 0 and use_decoupled_weight_decay:
        u = torch._foreach_add(u, p32, alpha=weight_decay)
    if momentum != 0:
        bufs = [s["momentum_buffer"] for s in states]
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, u)
        u = torch._foreach_add(u, bufs, alpha=momentum) if hp["use_nesterov"] else bufs
    torch._foreach_add_(p32, u, alpha=-lr)
    if low:
        torch._foreach_copy_(params, p32)


#: Shampoo's implementations, by ``impl`` name (``for_loop`` is the reference)
SHAMPOO_IMPLS = {"for_loop": _shampoo_for_loop, "foreach": _shampoo_foreach}


def shampoo(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    *,
    lr: float,
    beta1: float,
    beta2: float | None,
    epsilon: float,
    momentum: float,
    weight_decay: float,
    max_preconditioner_dim: int,
    precondition_frequency: int,
    start_preconditioning_step: int,
    inv_root_override: int,
    use_nesterov: bool,
    use_bias_correction: bool,
    use_decoupled_weight_decay: bool,
    grafting: str,
    grafting_beta2: float,
    grafting_epsilon: float,
    merge_dims: bool,
    precondition_1d: bool,
    root_dtype: torch.dtype | None,
    impl: str = "auto",
) -> None:
    """Shampoo over tensor lists (the functional API): :func:`shampoo_update_` for every tensor.

    ``states`` are the tensors' state dicts, made by :func:`shampoo_init_state_`.

    ``impl``: ``"for_loop"`` (one tensor at a time, the reference); ``"foreach"``: coupled decay,
    the grafting statistics and directions, the filtered gradient, the decoupled decay, momentum and
    the step as ``torch._foreach_*`` ops over the bucket, and the blocks of one shape (across all
    tensors) preconditioned by one batched matmul per dim with their grafting norms taken together;
    the factor statistics and the inverse roots (:func:`shampoo_precondition_`) run per tensor as in
    ``for_loop``, so the roots are bitwise the same and the two differ only by the rounding of the
    batched products. ``foreach`` stacks the roots of same-shaped blocks every step (a transient
    copy). ``"auto"``: ``foreach`` on CUDA, ``for_loop`` on the CPU. Buckets by (device, dtype):
    :func:`lightning_opt.optim.engine.dispatch`.
    """
    dispatch(
        "Shampoo",
        "shampoo",
        impl,
        SHAMPOO_IMPLS,
        {"params": params, "grads": grads, "states": states},
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        epsilon=epsilon,
        momentum=momentum,
        weight_decay=weight_decay,
        max_preconditioner_dim=max_preconditioner_dim,
        precondition_frequency=precondition_frequency,
        start_preconditioning_step=start_preconditioning_step,
        inv_root_override=inv_root_override,
        use_nesterov=use_nesterov,
        use_bias_correction=use_bias_correction,
        use_decoupled_weight_decay=use_decoupled_weight_decay,
        grafting=grafting,
        grafting_beta2=grafting_beta2,
        grafting_epsilon=grafting_epsilon,
        merge_dims=merge_dims,
        precondition_1d=precondition_1d,
        root_dtype=root_dtype,
    )


def _checked(ok: Callable[[Any], bool], hint: str) -> OptionCheck:
    def check(cls: str, key: str, value: Any) -> Any:
        check_arg(cls, key, value, ok(value), hint)
        return value

    return check


def _check_betas(cls: str, key: str, value: Any) -> tuple[float, float | None]:
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    ok = ok and is_number(value[0]) and 0 <= value[0] < 1
    ok = ok and (value[1] is None or (is_number(value[1]) and 0 < value[1] < 1))
    check_arg(
        cls,
        key,
        value,
        ok,
        "expected (beta1, beta2): beta1 in [0, 1) (the gradient EMA), beta2 in (0, 1) (the factor matrices' "
        "EMA) or None for a plain sum (the original Shampoo; Meta's beta2=1.0)",
    )
    return (float(value[0]), None if value[1] is None else float(value[1]))


def _int_at_least(low: int, hint: str) -> OptionCheck:
    return _checked(lambda v: is_int(v) and v >= low, hint)


#: Shampoo's own options and their checks (base.check_options: the constructor's and each group's)
_OPTION_CHECKS: dict[str, OptionCheck] = {
    "betas": _check_betas,
    "epsilon": _checked(lambda v: is_number(v) and v > 0, "it must be a finite number > 0"),
    "max_preconditioner_dim": _int_at_least(1, "it must be an int >= 1"),
    "precondition_frequency": _int_at_least(1, "it must be an int >= 1"),
    "start_preconditioning_step": _checked(
        lambda v: v is None or (is_int(v) and v >= 1), "expected None (= precondition_frequency) or an int >= 1"
    ),
    "inv_root_override": _int_at_least(0, "expected 0 (the default root 2 * order) or an int >= 1 (roots -1/r)"),
    "grafting": _checked(lambda v: isinstance(v, str) and v in GRAFTINGS, f"expected one of {GRAFTINGS}"),
    "grafting_beta2": _checked(lambda v: is_number(v) and 0 <= v < 1, "it must lie in [0, 1)"),
    "grafting_epsilon": _checked(lambda v: is_number(v) and v > 0, "it must be a finite number > 0"),
    "distributed": lambda cls, key, value: check_distributed(cls, value),
    "root_dtype": _checked(
        lambda v: v is None or (isinstance(v, str) and v in _ROOT_DTYPES),
        "expected None (the parameter's math dtype), 'float32' or 'float64'",
    ),
    **{
        key: check_flag
        for key in (
            "use_nesterov", "use_bias_correction", "use_decoupled_weight_decay", "merge_dims", "precondition_1d"
        )
    },
}


def _check_nesterov(options: dict[str, Any]) -> None:
    if options["use_nesterov"] and options["momentum"] == 0:
        raise ValueError(
            "Shampoo(use_nesterov=True) is invalid with momentum=0; set momentum > 0 or use_nesterov=False"
        )


class Shampoo(Optimizer):
    """Shampoo with blocking, grafting and periodic epsilon-regularized inverse roots (Meta's recipe).

    Per parameter with gradient ``G`` (math dtype: float32 for bf16/fp16, else the parameter's), at
    its ``t``-th step:

    1. ``G += wd p`` unless ``use_decoupled_weight_decay``.
    2. Layout (:func:`shampoo_layout`): 2-D+ parameters (1-D too with ``precondition_1d``) are, with
       ``merge_dims``, reshaped by merging small neighbouring dims, then split into blocks of at most
       ``max_preconditioner_dim`` per dim; every block ``B`` of order ``k`` has ``k`` factors.
    3. ``F_i <- beta2 F_i + (1 - beta2) B_(i) B_(i)^T`` (``beta2=None``: ``F_i += B_(i) B_(i)^T``).
    4. At ``t = start_preconditioning_step`` and every multiple of ``precondition_frequency`` after
       it: ``X_i = (F_i / (1 - beta2^t) + epsilon I)^(-1/r)``, ``r = inv_root_override or 2k``, by
       ``eigh`` in ``root_dtype``.
    5. ``Gf = EMA_beta1(G) / (1 - beta1^t)`` (``G`` with ``beta1 = 0``); the grafting method's
       direction ``P_g`` (adam: ``Gf / (sqrt(V / (1 - b^t)) + eps_g)`` with ``V = EMA_b(G^2)``;
       adagrad: ``V = sum G^2``, no correction; rmsprop: adam without correction; sgd / none: ``Gf``).
    6. ``P = P_g`` before ``start_preconditioning_step`` and for diagonal (1-D) parameters; else per
       block ``P = Gf x_1 X_1 ... x_k X_k`` (``L^(-1/4) Gf R^(-1/4)`` for a matrix), times
       ``||P_g|| / (||P|| + 1e-16)`` over the block unless ``grafting="none"``.
    7. ``P += wd p`` (decoupled decay); ``M <- momentum M + P``; ``P <- P + momentum M`` (Nesterov) or
       ``P <- M``; ``p -= lr P``.

    Args:
        params: parameters or param-group dicts (every option below may be set per group).
        lr: learning rate (default ``1e-3``: with Adam grafting the step has Adam's scale).
        betas: ``(beta1, beta2)``: the gradient EMA (0 turns it off) and the factor matrices' EMA
            (``None``: a plain sum, Meta's ``beta2=1.0``) (default ``(0.9, 0.999)``).
        epsilon: added to the eigenvalues of every factor before the root (default ``1e-12``).
        momentum: SGD momentum on the preconditioned direction (default 0).
        weight_decay: decay coefficient (default 0).
        max_preconditioner_dim: the largest factor (block size per dim) (default 1024).
        precondition_frequency: steps between root recomputations (default 100).
        start_preconditioning_step: the first step with Shampoo's direction (the grafting method's
            alone before it); ``None`` (default): ``precondition_frequency``.
        inv_root_override: ``0`` (default): roots ``-1/(2 order)``; ``r >= 1``: ``-1/r`` for all.
        use_nesterov: Nesterov momentum (default ``False``; needs ``momentum > 0``).
        use_bias_correction: divide the gradient EMA by ``1 - beta1^t`` and the factors by
            ``1 - beta2^t`` (default ``True``).
        use_decoupled_weight_decay: ``p``'s decay joins the direction (AdamW-style, default ``True``)
            rather than the gradient (L2).
        grafting: ``"adam"`` (default), ``"adagrad"``, ``"rmsprop"``, ``"sgd"`` or ``"none"``.
        grafting_beta2: the second-moment EMA of adam / rmsprop grafting (default ``0.999``).
        grafting_epsilon: added to the grafting method's root (default ``1e-8``).
        merge_dims: merge small neighbouring dims before blocking (default ``False``).
        precondition_1d: give 0-D/1-D parameters a full-matrix factor (root ``-1/2``) instead of the
            grafting method's diagonal update (default ``False``).
        root_dtype: dtype of the eigendecomposition, ``"float32"`` / ``"float64"``; ``None``
            (default): the math dtype. Factors and roots are stored in the math dtype.
        impl: ``"auto"`` (default: ``foreach`` on CUDA, ``for_loop`` on the CPU), ``"for_loop"`` or
            ``"foreach"`` (see :func:`shampoo`). Keyword-only.
        distributed: ``"auto"`` (default) or ``"local"``. With ``"auto"``, on FSDP2 shards
            (``fully_shard``: ``Shard(0)`` on a 1-D mesh) or under a process group of more than one
            rank (DDP), each preconditioned tensor is stepped whole on its owning rank (see the
            module docstring); ``state_dict()`` / ``load_state_dict()`` are then collectives (call
            them on every rank, as Lightning and ``torch.distributed.checkpoint`` do).
            ``"local"``: every process steps its own tensors as if alone. Keyword-only.

    Raises:
        ValueError: an invalid option (for the defaults or any group), a complex parameter
            ("shampoo does not support complex parameters").
        NotImplementedError: a DTensor with another layout than FSDP2's (tensor parallel, HSDP).
        ValueError: a DTensor with ``distributed="local"``.

    Example:
        >>> opt = Shampoo(model.parameters(), lr=1e-3, weight_decay=1e-5, precondition_frequency=100)

    Defaults, and which reference each option matches (ALGORITHMS-style note):

    - Meta's ``DistributedShampoo`` constructor: ``lr=1e-2, betas=(0.9, 1.0), epsilon=1e-12,
      momentum=0, weight_decay=0, max_preconditioner_dim=1024, precondition_frequency=1,
      start_preconditioning_step=-1 (= frequency), use_bias_correction=True,
      use_decoupled_weight_decay=True, grafting_config=None, use_merge_dims=True``. Ours follow its
      README's AdamW-replacement recipe instead (``lr=1e-3, betas=(0.9, 0.999)``, Adam grafting
      with ``beta2=0.999, epsilon=1e-8``, ``precondition_frequency=100``) and keep its
      ``epsilon``, ``max_preconditioner_dim`` and flags.
    - Matches Meta's algorithm (step order, filtered gradient with bias correction, factor bias
      correction, ``-min(lambda_min, 0)`` shift + epsilon before the eigen-root, per-block
      grafting with the 1e-16 guard, Adam / AdaGrad / RMSProp / SGD grafting, decay in the
      direction before momentum, root schedule ``t == start or (t > start and t % f == 0)``);
      proven against a float64 recurrence (``tests/optim/test_shampoo.py``).
    - ``pytorch_optimizer.Shampoo`` equals ours with ``betas=(0, None), grafting="none",
      precondition_frequency=1, start_preconditioning_step=1, precondition_1d=True`` (its eps is the
      initial ``eps I`` of the sums; coupled and decoupled decay both match);
      ``pytorch_optimizer.ScalableShampoo`` (``use_svd=True, shape_interpretation=False``) equals ours
      for blocking (``block_size``), frequency, start step, ``inverse_exponent_override``, sgd /
      adagrad / rmsprop grafting (single-block tensors: it grafts per tensor), momentum and Nesterov
      (SGD grafting, ``start == frequency``), 1-D parameters (diagonal), ``beta2`` EMA (with
      ``use_bias_correction=False``; it decays its initial ``eps I`` with the sums where ours adds a
      constant ``eps I``: equal up to ``eps (1 - beta2^t)`` on the diagonal).

    Differences on purpose: without grafting, before ``start_preconditioning_step`` the step is the
    (filtered) gradient (SGD) where Meta's would be zero (its inverse roots start at zero); 1-D
    parameters are diagonal by default (Google's Scalable Shampoo, ``pytorch_optimizer``'s; Meta
    preconditions them with a full matrix: ``precondition_1d=True``); ``merge_dims=False`` by default
    (Meta merges, which turns e.g. a 32 x 32 matrix into one 1024 x 1024 factor); the step counts
    each parameter's own steps (Meta counts group steps: the same when every parameter gets a
    gradient every step); ``start_preconditioning_step`` may be below ``precondition_frequency``
    (the roots are computed at the start step); ``beta2`` is ``None`` rather than 1.0 for the plain
    sum (the registry's argument check keeps every beta in [0, 1)); not implemented: Meta's
    ``beta3``, ``dampening``, ``exponent_multiplier``, per-order root lists, quantized state,
    Newton root iterations, ``pytorch_optimizer.Shampoo``'s momentum (it mixes the raw gradient with
    the last preconditioned update). The state of bf16/fp16 parameters is float32. Papers: Gupta et
    al., arXiv:1802.09568; Anil et al., arXiv:2002.09018; Shi et al., arXiv:2309.06497.
    """

    #: the ``impl`` values this class takes besides ``"auto"`` (the contract suite runs each)
    impls: ClassVar[tuple[str, ...]] = tuple(SHAMPOO_IMPLS)
    #: Kronecker factors have no complex form here (refused with base.reject_complex)
    supports_complex: ClassVar[bool] = False
    #: group options with their own checks (base.check_options: the constructor's and each group's)
    option_checks: ClassVar[dict[str, OptionCheck]] = _OPTION_CHECKS

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float | None] = (0.9, 0.999),
        epsilon: float = 1e-12,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        max_preconditioner_dim: int = 1024,
        precondition_frequency: int = 100,
        start_preconditioning_step: int | None = None,
        inv_root_override: int = 0,
        use_nesterov: bool = False,
        use_bias_correction: bool = True,
        use_decoupled_weight_decay: bool = True,
        grafting: Grafting = "adam",
        grafting_beta2: float = 0.999,
        grafting_epsilon: float = 1e-8,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        root_dtype: RootDtype | None = None,
        *,
        impl: Impl = "auto",
        distributed: Distributed = "auto",
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "epsilon": epsilon,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "max_preconditioner_dim": max_preconditioner_dim,
            "precondition_frequency": precondition_frequency,
            "start_preconditioning_step": start_preconditioning_step,
            "inv_root_override": inv_root_override,
            "use_nesterov": use_nesterov,
            "use_bias_correction": use_bias_correction,
            "use_decoupled_weight_decay": use_decoupled_weight_decay,
            "grafting": grafting,
            "grafting_beta2": grafting_beta2,
            "grafting_epsilon": grafting_epsilon,
            "merge_dims": merge_dims,
            "precondition_1d": precondition_1d,
            "root_dtype": root_dtype,
            "impl": impl,
            "distributed": distributed,
        }
        # the same checks every param group's own options get (base.check_options)
        defaults = check_options("Shampoo", defaults, impls=SHAMPOO_IMPLS, checks=self.option_checks)
        super().__init__(params, defaults)
        guard_param_layout(self, type(self).__name__, "preconditions each whole matrix with Kronecker factors")
        keep_state_dtype_on_load(self)
        install_owner_state_hooks(self, self._owner_state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        backfill_group_defaults(self, impl="auto", distributed="auto")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its options, complex and DTensor (sharded) parameters are checked first.

        Nothing is added when a check fails.
        """
        if isinstance(param_group, dict) and param_group.get("params") is not None:
            params = param_group["params"]
            if not isinstance(params, (Tensor, set)):  # a generator is read once
                param_group = {**param_group, "params": list(params)}
            # the registry name, as the error the issue specifies reads
            reject_complex("shampoo", param_group["params"])
        param_group = check_param_group(self, param_group)
        _check_nesterov({**self.defaults, **param_group})
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else params
        names = param_group.get("param_names") or [None] * len(params)
        distributed = param_group.get("distributed", self.defaults["distributed"])
        for p, name in zip(params, names):
            check_shardable("Shampoo", p, name, distributed=distributed)
        super().add_param_group(param_group)

    @staticmethod
    def _layout(p: Tensor, group: dict[str, Any]) -> Layout:
        return shampoo_layout(
            tuple(p.shape), group["max_preconditioner_dim"], group["merge_dims"], group["precondition_1d"]
        )

    @staticmethod
    def _hparams(group: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of :func:`shampoo_update_` / :func:`shampoo` for ``group``."""
        beta1, beta2 = group["betas"]
        return {
            "lr": group["lr"],
            "beta1": beta1,
            "beta2": beta2,
            "epsilon": group["epsilon"],
            "momentum": group["momentum"],
            "weight_decay": group["weight_decay"],
            "max_preconditioner_dim": group["max_preconditioner_dim"],
            "precondition_frequency": group["precondition_frequency"],
            "start_preconditioning_step": group["start_preconditioning_step"] or group["precondition_frequency"],
            "inv_root_override": group["inv_root_override"],
            "use_nesterov": group["use_nesterov"],
            "use_bias_correction": group["use_bias_correction"],
            "use_decoupled_weight_decay": group["use_decoupled_weight_decay"],
            "grafting": group["grafting"],
            "grafting_beta2": group["grafting_beta2"],
            "grafting_epsilon": group["grafting_epsilon"],
            "merge_dims": group["merge_dims"],
            "precondition_1d": group["precondition_1d"],
            "root_dtype": _ROOT_DTYPES[group["root_dtype"]],
        }

    @staticmethod
    def _init(p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        shampoo_init_state_(
            p,
            state,
            layout=Shampoo._layout(p, group),
            grafting=group["grafting"],
            beta1=group["betas"][0],
            momentum=group["momentum"],
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; ``closure`` (re-evaluating the loss) is called once, with grad enabled."""
        loss = run_closure(closure)
        topo, owners = self._topology_and_owners()
        shared = []  # (group, param) of the preconditioned tensors stepped by their owners
        for group in self.param_groups:
            params, grads, states = [], [], []
            for p in params_with_grad(group, "Shampoo"):
                state = self.state[p]
                if id(p) in owners:
                    shared.append((group, p))
                    continue
                if topo.mode == "fsdp" and group["distributed"] == "auto":
                    self._local_shard_step(p, group, state)  # a diagonal shard: elementwise on its rows
                    continue
                self._init(p, group, state)
                params.append(p)
                grads.append(p.grad)
                states.append(state)
            shampoo(params, grads, states, **self._hparams(group), impl=group["impl"])
        if shared:
            self._owner_step(topo, owners, shared)
        return loss

    # --- FSDP2 shards and DDP replicas (lightning_opt.optim.distributed) ------------------------

    def _topology_and_owners(self) -> tuple[Topology, dict[int, int]]:
        """The topology and the owner of every preconditioned tensor of a ``distributed="auto"`` group.

        The owners cover every such parameter (with a gradient or not) and are cached while the
        parameters and the world size stay the same: their state lives there.
        """
        auto = [(g, p) for g in self.param_groups if g["distributed"] == "auto" for p in g["params"]]
        topo = topology([p for _, p in auto])
        if topo.mode == "single":
            return topo, {}
        items = []
        for group, p in auto:
            layout = self._layout(p, group)
            if layout is not None:
                items.append((p, tuple(p.shape), shampoo_cost(layout, group["precondition_frequency"])))
        return topo, cached_owners(self, topo, items)

    def _owner_state(self) -> tuple[Topology, list[OwnerStateEntry]]:
        topo, owners = self._topology_and_owners()
        entries = []
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in owners or "step" not in self.state.get(p, {}):
                    continue
                shapes = [(n, n) for block in self._layout(p, group)[1] for n in _block_dims(block)]
                layout: dict[str, Any] = {"factors": shapes, "roots": list(shapes)}
                for key, needed in _elementwise_keys(group):
                    if needed:
                        layout[key] = tuple(p.shape)
                entries.append(OwnerStateEntry(p, owners[id(p)], layout, compute_dtype(p), local(p).device))
        return topo, entries

    def _local_shard_step(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        # a diagonal (0-D/1-D) parameter: every phase is elementwise, so this rank steps its own rows;
        # the state tensors are DTensors sharded like p (portable checkpoints)
        state.setdefault("step", 0)
        for key, needed in _elementwise_keys(group):
            if needed and key not in state:
                state[key] = torch.zeros_like(p, dtype=compute_dtype(p), memory_format=torch.contiguous_format)
        view = {k: local(v) if isinstance(v, Tensor) else v for k, v in state.items()}
        shampoo_update_(local(p), local(p.grad), view, **self._hparams(group))
        state["step"] = view["step"]

    def _owner_step(
        self, topo: Topology, owners: dict[int, int], shared: list[tuple[dict[str, Any], Tensor]]
    ) -> None:
        """Step the preconditioned tensors, each whole on its owner (:func:`shampoo_update_` on the
        gathered gradient and parameter); every rank takes its rows of the updated parameter."""
        jobs = []
        for group, p in shared:
            state = self.state[p]
            owner = owners[id(p)]
            if owner != topo.rank:
                state["step"] = state.get("step", 0) + 1  # on the owner shampoo_update_ counts
            hp = self._hparams(group)

            def compute(full: list[Tensor], state=state, group=group, hp=hp) -> list[Tensor]:
                g, w = full  # the whole gradient and a gathered copy of the parameter, updated in place
                Shampoo._init(w, group, state)
                shampoo_update_(w, g, state, **hp)
                return [w]

            grad = local(p.grad).to(p.dtype)
            jobs.append(MatrixJob(owner, [grad, local(p).detach()], p.shape[0], [tuple(p.shape)], compute))
        for (_, p), outputs in zip(shared, owner_compute(topo, jobs)):
            local(p).copy_(outputs[0])


def _elementwise_keys(group: dict[str, Any]) -> list[tuple[str, bool]]:
    """The parameter-shaped state keys and whether ``group``'s options need them."""
    return [
        ("graft_sq", group["grafting"] in ("adam", "adagrad", "rmsprop")),
        ("filtered_grad", group["betas"][0] > 0),
        ("momentum_buffer", group["momentum"] > 0),
    ]


register(
    OptimInfo(
        name="shampoo",
        cls=Shampoo,
        description="Shampoo with blocking, grafting and periodic inverse roots (Meta's Distributed Shampoo)",
        paper="Gupta et al., arXiv:1802.09568; Shi et al., arXiv:2309.06497",
        default_lr=1e-3,
    )
)
