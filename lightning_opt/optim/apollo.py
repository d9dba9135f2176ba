"""APOLLO and APOLLO-Mini: AdamW-like updates at SGD-like memory (Zhu et al. 2024, arXiv:2412.05270).

For a selected 2-D weight ``W`` (m x n) with gradient ``G``, APOLLO keeps Adam moments only for a
random projection ``R`` of ``G`` to ``rank`` dimensions and uses them to *scale the raw gradient*:

1. ``R = G P^T`` (``P``: rank x n) when m >= n, else ``R = P^T G`` (``P``: m x rank); ``P`` is
   Gaussian with variance ``1/rank``, regenerated from a seed every ``update_proj_gap`` steps.
2. ``m, v <- Adam moments of R``; ``N = m_hat / (sqrt(v_hat) + eps)`` (bias-corrected).
3. ``s = ||N|| / (||R|| + 1e-8)``: per channel (the norm over the rank dimension, one factor per
   row of ``W`` when m >= n, per column otherwise) or per tensor.
4. ``U = sqrt(scale) * s * G``; the norm-growth limiter (Fira, arXiv:2410.01623) rescales ``U`` so
   that ``||U||`` grows at most by ``norm_growth_limit`` (1.01) per step.
5. ``W <- W (1 - lr wd) - lr U`` (Algorithm 1 of the paper; ``scale`` is the paper's alpha squared).

The authors' code (``apollo_torch``) differs in two small ways, available as
``convention="reference"``: it computes ``N = m / (sqrt(v) + eps)`` and folds the bias correction
into the step, ``W <- W - lr sqrt(1 - b2^t) / (1 - b1^t) U`` (so eps is effectively
``eps / sqrt(1 - b2^t)``, and the limiter sees the uncorrected update), and it decays after the
update, ``W <- W - lr wd W`` on the new ``W``; its other parameters get Hugging Face's AdamW (the
same two differences) instead of torch's.

Every other parameter gets AdamW in the same optimizer (one object for Lightning's automatic
optimization). The math lives in plain functions of tensors so a fused kernel or a sharded wrapper
can reuse it: the APOLLO step is :func:`apollo_direction` (the low-rank projection, its moments and
the gradient scaling: whole-matrix work) then :func:`apollo_apply_` (elementwise), composed in
:func:`apollo_update_`; :func:`random_projection` draws ``P``. The torch-convention AdamW side is
:func:`lightning_opt.optim._hybrid.adamw_side` (shared with Muon), the reference convention's is
:func:`adamw_reference_side` over :func:`adamw_update_reference_`.

Registered as ``apollo`` (Hugging Face ``apollo_adamw``) and ``apollo_mini`` (rank 1, tensor-wise
scaling, ``scale=128``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_opt.optim._hybrid import adamw_side, adamw_state_, route_matrices
from lightning_opt.optim.base import (
    DEFAULT_ADAMW_PATTERNS,
    OptionCheck,
    adamw_update_,
    backfill_group_defaults,
    check_arg,
    check_flag,
    check_param_group,
    compute_dtype,
    int_at_least,
    is_int,
    is_number,
    keep_state_dtype_on_load,
    number_in,
    one_of,
    reject_sparse_grad,
    run_closure,
)
from lightning_opt.optim.distributed import (
    Distributed,
    MatrixJob,
    OwnerStateEntry,
    Topology,
    cached_owners,
    check_distributed,
    install_owner_state_hooks,
    local,
    owner_compute,
    topology,
)
from lightning_opt.optim.engine import Impl, check_impl, dispatch
from lightning_opt.optim.layout import guard_param_layout
from lightning_opt.optim.precision import LOW_PRECISION
from lightning_opt.optim.registry import OptimInfo, register, register_alias

__all__ = [
    "APOLLO",
    "APOLLOMini",
    "APOLLO_IMPLS",
    "adamw_reference_side",
    "adamw_update_reference_",
    "apollo_apply_",
    "apollo_cost",
    "apollo_direction",
    "apollo_update_",
    "next_projection_seed",
    "project",
    "random_projection",
]

ScaleType = Literal["channel", "tensor"]
Convention = Literal["paper", "reference"]
Proj = Literal["random"]

#: added to ||R|| in the scaling factor and to the previous norm in the limiter (the reference's)
_TINY = 1e-8


def next_projection_seed(seed: int) -> int:
    """The seed of the next projection: the 15th int64 drawn from a CPU generator seeded ``seed``.

    The same chain as the reference implementation (``apollo_torch``), so projections match it.
    """
    gen = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (15,), generator=gen)[-1])


def random_projection(
    shape: Sequence[int],
    rank: int,
    seed: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The Gaussian projection (variance ``1/rank``) for a ``shape`` = (m, n) gradient.

    Returns ``P`` of shape (rank, n) when m >= n (project ``G P^T``), else (m, rank) (``P^T G``).
    It is drawn in float32 from a CPU generator seeded ``seed`` and then cast and moved, so the same
    seed gives the same matrix on every device and after a checkpoint resume.
    """
    m, n = shape
    size = (rank, n) if m >= n else (m, rank)
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(size, generator=gen, dtype=torch.float32) / math.sqrt(rank)
    return proj.to(device=device, dtype=dtype)


def project(grad: Tensor, proj: Tensor) -> Tensor:
    """``G P^T`` (m >= n) or ``P^T G`` (m < n): the rank-r image of ``grad``."""
    if grad.shape[0] >= grad.shape[1]:
        return grad @ proj.t()
    return proj.t() @ grad


def apollo_cost(shape: Sequence[int], rank: int) -> float:
    """Flops of one APOLLO step on an ``m x n`` matrix (the owner-compute cost model).

    The projection ``2 m n rank`` plus ~10 elementwise passes over ``G`` (the scaling, the norms).
    """
    m, n = shape
    return float(2 * m * n * rank + 10 * m * n)


def adamw_update_reference_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """The AdamW step ``apollo_torch.APOLLOAdamW`` gives the parameters it does not project
    (Hugging Face's AdamW): ``p <- p - lr sqrt(bc2)/bc1 * m / (sqrt(v) + eps)``, then
    ``p <- p - lr wd p`` (decay after the update, eps not bias-corrected); used with
    ``convention="reference"``. ``convention="paper"`` uses torch's AdamW, :func:`adamw_update_`.
    """
    dt = compute_dtype(param)
    g = grad.to(dt)
    p = param.to(dt)
    exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    p.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=-lr * math.sqrt(bc2) / bc1)
    if weight_decay != 0:
        p.add_(p, alpha=-lr * weight_decay)
    if p is not param:
        param.copy_(p)


def _adamw_reference_for_loop(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay):
    for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        adamw_update_reference_(
            p, g, m, v, step=s, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay
        )


def _adamw_reference_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay):
    low = params[0].dtype in LOW_PRECISION
    g = [x.float() for x in grads] if low else [x.to(p.dtype) for x, p in zip(grads, params)]
    p32 = [p.float() for p in params] if low else params
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, g, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, g, g, value=1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(p32, exp_avgs, denom, [-lr * math.sqrt(1 - beta2**s) / (1 - beta1**s) for s in steps])
    if weight_decay != 0:
        torch._foreach_add_(p32, p32, alpha=-lr * weight_decay)
    if low:
        torch._foreach_copy_(params, p32)


#: the implementations of the reference convention's AdamW side, by ``impl`` name
APOLLO_IMPLS = {"for_loop": _adamw_reference_for_loop, "foreach": _adamw_reference_foreach}


def adamw_reference_side(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    impl: str = "auto",
    cls: str = "APOLLO",
) -> None:
    """:func:`adamw_update_reference_` over tensor lists, by ``impl`` (``for_loop``, ``foreach``;
    ``auto``: ``foreach`` on CUDA, ``for_loop`` elsewhere). ``steps``: each tensor's 1-based count."""
    dispatch(
        cls,
        "apollo",
        impl,
        APOLLO_IMPLS,
        {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "steps": steps},
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
    )


def apollo_direction(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    proj: Tensor,
    *,
    step: int,
    beta1: float,
    beta2: float,
    eps: float,
    scale: float,
    scale_type: ScaleType,
    scale_front: bool = False,
    norm_growth_limit: float | None = 1.01,
    prev_norm: Tensor | None = None,
    convention: Convention = "paper",
) -> tuple[Tensor, Tensor | None]:
    """The whole-matrix phase of an APOLLO step: project, update the low-rank moments, scale ``grad``.

    Steps 1-4 of the module docstring: ``R = project(G)``, the Adam moments of ``R`` (in place),
    the channel- or tensor-wise factor ``||N|| / ||R||``, ``sqrt(scale)`` and the norm-growth limiter.
    Arguments as in :func:`apollo_update_`; the math runs in ``exp_avg``'s dtype (float32 for
    bf16/fp16 parameters).

    Returns:
        The scaled update ``U`` (``grad``'s shape, before the lr) and the norm to pass as
        ``prev_norm`` next step (``None`` without a limiter).
    """
    g = grad.to(exp_avg.dtype)
    r = project(g, proj)
    exp_avg.mul_(beta1).add_(r, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(r, r, value=1 - beta2)
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    if convention == "paper":
        norm_update = (exp_avg / bc1).div_((exp_avg_sq / bc2).sqrt_().add_(eps))
    else:
        norm_update = exp_avg / exp_avg_sq.sqrt().add_(eps)
    if scale_type == "channel":
        dim = 1 if g.shape[0] >= g.shape[1] else 0  # the rank dimension of r
        factor = torch.linalg.vector_norm(norm_update, dim=dim) / (torch.linalg.vector_norm(r, dim=dim) + _TINY)
        if dim == 1:
            factor = factor.unsqueeze(1)
    else:
        factor = torch.linalg.vector_norm(norm_update) / (torch.linalg.vector_norm(r) + _TINY)
    update = g * factor
    root_scale = math.sqrt(scale)
    if scale_front:
        update.mul_(root_scale)
    new_norm = None
    if norm_growth_limit is not None:
        norm = torch.linalg.vector_norm(update)
        if prev_norm is None:
            new_norm = norm
        else:
            # tensor ops only: no host sync per step
            limiter = torch.clamp(norm / (prev_norm + _TINY), min=norm_growth_limit) / norm_growth_limit
            update.div_(limiter)
            new_norm = norm / limiter
    if not scale_front:
        update.mul_(root_scale)
    return update, new_norm


def apollo_apply_(
    param: Tensor,
    update: Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    convention: Convention = "paper",
) -> None:
    """The elementwise phase of an APOLLO step, in place on ``param`` (rounded once for bf16/fp16).

    ``"paper"``: ``W <- W (1 - lr wd) - lr U``; ``"reference"``: ``W <- W - lr sqrt(bc2)/bc1 U``, then
    ``W <- W - lr wd W``.
    """
    dt = compute_dtype(param)
    if convention == "paper":
        step_size = lr
    else:
        bc1, bc2 = 1 - beta1**step, 1 - beta2**step
        step_size = lr * math.sqrt(bc2) / bc1
    p = param.to(dt)
    if convention == "paper":
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        p.add_(update, alpha=-step_size)
    else:
        p.add_(update, alpha=-step_size)
        if weight_decay != 0:
            p.add_(p, alpha=-lr * weight_decay)
    if p is not param:
        param.copy_(p)


def apollo_update_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    proj: Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    scale_type: ScaleType,
    scale_front: bool = False,
    norm_growth_limit: float | None = 1.01,
    prev_norm: Tensor | None = None,
    convention: Convention = "paper",
) -> Tensor | None:
    """One APOLLO step for one 2-D tensor, in place on ``param`` and the low-rank moments.

    :func:`apollo_direction` then :func:`apollo_apply_`.

    Args:
        param, grad: the (m, n) weight and its gradient.
        exp_avg, exp_avg_sq: Adam moments of the projected gradient (shape of ``project(grad, proj)``).
        proj: the projection from :func:`random_projection`.
        step: 1-based step count (bias correction).
        lr, beta1, beta2, eps, weight_decay: as in AdamW.
        scale: the update is multiplied by ``sqrt(scale)``.
        scale_type: ``"channel"`` (one factor per row when m >= n, per column otherwise) or ``"tensor"``.
        scale_front: apply ``sqrt(scale)`` before the norm-growth limiter instead of after.
        norm_growth_limit: max growth factor of the update norm per step (``None``: no limiter).
        prev_norm: the limited update norm of the previous step (``None`` on the first).
        convention: ``"paper"`` (Algorithm 1: ``N = m_hat / (sqrt(v_hat) + eps)`` and
            ``W <- W (1 - lr wd) - lr U``) or ``"reference"`` (``apollo_torch``: ``N = m / (sqrt(v) + eps)``,
            ``W <- W - lr sqrt(bc2)/bc1 U``, then ``W <- W - lr wd W``).

    Returns:
        The update norm to pass as ``prev_norm`` next step (``None`` without a limiter).
    """
    update, new_norm = apollo_direction(
        grad,
        exp_avg,
        exp_avg_sq,
        proj,
        step=step,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        scale=scale,
        scale_type=scale_type,
        scale_front=scale_front,
        norm_growth_limit=norm_growth_limit,
        prev_norm=prev_norm,
        convention=convention,
    )
    apollo_apply_(
        param, update, step=step, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, convention=convention
    )
    return new_norm


class APOLLO(Optimizer):
    """APOLLO on selected 2-D weights, AdamW on everything else, in one optimizer.

    Which side a parameter takes is decided when its group is added and saved in the group
    (``apollo_mask``), so a checkpoint resumes with the same split:

    1. a group key ``use_apollo`` (``True``/``False``) decides for the whole group (``True`` on a
       parameter that is not 2-D is an error);
    2. otherwise a 2-D parameter gets APOLLO if its name (the group's ``param_names``) matches one of
       ``target_modules`` (``re.search``, like Hugging Face's ``optim_target_modules``), or, with
       ``target_modules=None``, if it matches none of :data:`~lightning_opt.optim.muon.DEFAULT_ADAMW_PATTERNS`
       (embeddings and the output head stay on AdamW, the rule ``muon`` uses). Parameters that are
       not 2-D (biases, norms) always get AdamW.

    Args:
        params: parameters, or param-group dicts with ``param_names`` (``build_optimizer`` adds them).
        lr: learning rate of both sides (default ``1e-2``, the APOLLO README's).
        betas: Adam ``(beta1, beta2)`` (default ``(0.9, 0.999)``).
        eps: added to ``sqrt(v_hat)`` (default ``1e-6``, the reference's).
        weight_decay: decoupled decay ``p *= 1 - lr * wd`` (default ``0.0``).
        rank: rank of the projection (default ``128``, Hugging Face's; the paper uses ~1/4 of the
            hidden size). A rank at or above the projected dimension still works but saves nothing.
        scale: the APOLLO update is multiplied by ``sqrt(scale)`` (default ``1.0``).
        scale_type: ``"channel"`` (default) or ``"tensor"`` gradient scaling.
        update_proj_gap: steps between projection refreshes (default ``200``).
        proj: projection kind; only ``"random"`` (default) is implemented.
        target_modules: name regexes selecting the APOLLO weights (default ``None``: see above). A
            single string is one regex. Each must match at least one 2-D parameter.
        scale_front: apply ``sqrt(scale)`` before the norm-growth limiter (default ``False``).
        norm_growth_limit: the limiter's max growth of the update norm per step (default ``1.01``;
            ``None`` turns it off, the reference's ``disable_nl=True``).
        convention: ``"paper"`` (default; torch's AdamW on the other parameters) or
            ``"reference"`` (``apollo_torch``'s eps placement and decay order, see the module docstring).
        impl: how the AdamW side runs (the APOLLO side is one matrix at a time whatever it is):
            ``"auto"`` (default: with ``convention="paper"`` the fused C kernel on the CPU and Triton
            on CUDA; with ``"reference"`` ``for_loop`` on the CPU and ``foreach`` on CUDA),
            ``"for_loop"`` or ``"foreach"``.
        distributed: ``"auto"`` (default) or ``"local"``. With ``"auto"``, on FSDP2 shards
            (``fully_shard``) and under DDP (a process group of more than one rank) each APOLLO
            matrix is stepped whole on one owning rank (:mod:`lightning_opt.optim.distributed`:
            the gradient's rows are sent there, the scaled update's rows sent back); its projection
            and low-rank moments live on that owner, and ``state_dict()`` presents them sharded by
            rows (FSDP2) or replicated (DDP), a collective then (call it on every rank, as
            Lightning and ``torch.distributed.checkpoint`` do). ``"local"``: every process steps
            its own tensors alone (refused for shards).

    Raises:
        ValueError: invalid lr, betas, eps, weight_decay, rank, scale, scale_type, update_proj_gap,
            proj, norm_growth_limit, convention, impl, distributed or a regex; a ``target_modules``
            pattern that matches no 2-D parameter; ``target_modules`` without parameter names;
            ``use_apollo=True`` on a non-2-D parameter; ``scale_front`` or a group's ``use_apollo``
            not a bool; a DTensor on the APOLLO side with ``distributed="local"``.
        NotImplementedError: a DTensor on the APOLLO side that is not FSDP2's ``Shard(0)`` on a 1-D mesh.

    Example:
        >>> opt = build_optimizer(model, "apollo", lr=1e-2, rank=256, target_modules=[r"attn", r"mlp"])
        >>> opt = build_optimizer(model, "apollo_mini", lr=1e-2)

    With ``convention="reference"`` it matches ``apollo_torch.APOLLOAdamW`` (apollo-torch 1.0.3, the
    authors' code; ``proj_type="std"``, ``correct_bias=True``), including its projection seeds (the
    1-based position of the parameter in the optimizer, advanced by :func:`next_projection_seed` at
    every refresh); the default follows the paper (see the module docstring). Other differences from
    the reference, in both conventions: the projection is always drawn
    on CPU in float32 and moved (the reference draws on the parameter's device, so CUDA projections
    differ from it but not between runs); the moments of bf16/fp16 parameters are float32; the
    closure runs with grad enabled (the reference calls it under ``no_grad``). The projection matrix
    and the next seed are optimizer state, so a resumed run uses the same projections.
    Paper: Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", arXiv:2412.05270.
    """

    #: the ``impl`` values this class takes besides ``"auto"`` (they choose the AdamW side's impl)
    impls: ClassVar[tuple[str, ...]] = ("for_loop", "foreach")
    #: projected matrix statistics have no complex form here (base.reject_complex)
    supports_complex: ClassVar[bool] = False
    #: group options with their own checks (base.check_options: the constructor's and each group's)
    option_checks: ClassVar[dict[str, OptionCheck]] = {
        "rank": int_at_least(1),
        "scale": number_in(lambda x: x > 0, "it must be a finite number > 0 (the update is multiplied by sqrt(scale))"),
        "scale_type": one_of(get_args(ScaleType)),
        "update_proj_gap": int_at_least(1),
        "proj": one_of(get_args(Proj)),
        "norm_growth_limit": number_in(
            lambda x: x >= 1, "it must be a number >= 1 (1.01 in the paper) or None to turn the limiter off", optional=True
        ),
        "convention": one_of(get_args(Convention)),
    }

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        rank: int = 128,
        scale: float = 1.0,
        scale_type: ScaleType = "channel",
        update_proj_gap: int = 200,
        proj: Proj = "random",
        target_modules: Sequence[str] | str | None = None,
        scale_front: bool = False,
        norm_growth_limit: float | None = 1.01,
        convention: Convention = "paper",
        impl: Impl = "auto",
        distributed: Distributed = "auto",
    ) -> None:
        name = type(self).__name__
        check_arg(name, "lr", lr, is_number(lr) and lr >= 0, "lr must be a finite number >= 0")
        check_arg(
            name,
            "weight_decay",
            weight_decay,
            is_number(weight_decay) and weight_decay >= 0,
            "it must be a finite number >= 0",
        )
        ok = isinstance(betas, (tuple, list)) and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas)
        check_arg(name, "betas", betas, ok, "expected a tuple of 2 floats in [0, 1)")
        check_arg(name, "eps", eps, is_number(eps) and eps >= 0, "it must be a finite number >= 0")
        check_arg(name, "rank", rank, is_int(rank) and rank >= 1, "it must be an int >= 1 (APOLLO-Mini uses 1)")
        check_arg(
            name,
            "scale",
            scale,
            is_number(scale) and scale > 0,
            "it must be a finite number > 0 (the update is multiplied by sqrt(scale))",
        )
        check_arg(
            name, "scale_type", scale_type, scale_type in get_args(ScaleType), f"expected one of {get_args(ScaleType)}"
        )
        check_arg(
            name,
            "update_proj_gap",
            update_proj_gap,
            is_int(update_proj_gap) and update_proj_gap >= 1,
            "it must be an int >= 1 (steps between projection refreshes)",
        )
        check_arg(name, "proj", proj, proj in get_args(Proj), "only the random projection ('random') is implemented")
        ok = norm_growth_limit is None or (is_number(norm_growth_limit) and norm_growth_limit >= 1)
        check_arg(
            name,
            "norm_growth_limit",
            norm_growth_limit,
            ok,
            "it must be a number >= 1 (1.01 in the paper) or None to turn the limiter off",
        )
        check_arg(
            name,
            "convention",
            convention,
            convention in get_args(Convention),
            f"expected one of {get_args(Convention)}",
        )
        if isinstance(target_modules, str):
            target_modules = (target_modules,)
        if target_modules is not None:
            target_modules = tuple(target_modules)
            check_arg(
                name,
                "target_modules",
                target_modules,
                len(target_modules) > 0,
                "pass at least one regex, or None for every hidden 2-D weight",
            )
            for pattern in target_modules:
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as err:
                    raise ValueError(f"{name}(target_modules=[..., {pattern!r}]) is invalid: {err}") from err
        defaults = {
            "lr": lr,
            "betas": (float(betas[0]), float(betas[1])),
            "eps": eps,
            "weight_decay": weight_decay,
            "rank": rank,
            "scale": float(scale),
            "scale_type": scale_type,
            "update_proj_gap": update_proj_gap,
            "proj": proj,
            "target_modules": target_modules,
            "scale_front": check_flag(name, "scale_front", scale_front),
            "norm_growth_limit": None if norm_growth_limit is None else float(norm_growth_limit),
            "convention": convention,
            "impl": check_impl(name, impl, APOLLO.impls),
            "distributed": check_distributed(name, distributed),
        }
        super().__init__(params, defaults)
        guard_param_layout(self, type(self).__name__, "projects each whole matrix to a low-rank space")
        if target_modules is not None:
            self._check_targets(name, target_modules)
        keep_state_dtype_on_load(self)
        install_owner_state_hooks(self, self._owner_state)
        self.register_load_state_dict_post_hook(APOLLO._backfill_masks)

    def _check_targets(self, name: str, target_modules: tuple[str, ...]) -> None:
        matched = set()
        for group in self.param_groups:
            if group.get("target_modules") is None or group.get("use_apollo") is not None:
                continue
            names = group.get("param_names")
            if names is None:
                raise ValueError(
                    f"{name}(target_modules={list(target_modules)!r}) needs parameter names: build it with "
                    "build_optimizer(model, ...) or pass groups with 'param_names'"
                )
            for n, p in zip(names, group["params"]):
                if p.ndim == 2:
                    matched.update(pat for pat in group["target_modules"] if re.search(pat, n))
        missing = [p for p in target_modules if p not in matched]
        if missing:
            raise ValueError(
                f"{name}(target_modules={list(target_modules)!r}): {missing!r} match no 2-D parameter; "
                "patterns are re.search-ed against parameter names such as 'layers.0.attn.q_proj.weight'"
            )

    def _apollo_mask(self, group: dict[str, Any]) -> list[bool]:
        targets = group["target_modules"]
        return route_matrices(
            group["params"],
            group.get("param_names"),
            cls=type(self).__name__,
            override_key="use_apollo",
            override=group.get("use_apollo"),
            exclude=DEFAULT_ADAMW_PATTERNS if targets is None else (),
            include=targets,
            flatten_conv=None,
            matrix_hint="APOLLO projects 2-D weights only",
            distributed=group.get("distributed", "auto"),
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its APOLLO/AdamW split is decided here and stored as ``group["apollo_mask"]``."""
        # its own options checked as the constructor's, before it is added
        super().add_param_group(check_param_group(self, param_group))
        group = self.param_groups[-1]
        group["apollo_mask"] = self._apollo_mask(group)

    @staticmethod
    def _backfill_masks(opt: Optimizer) -> None:
        for group in opt.param_groups:
            group.setdefault("impl", "auto")
            if "apollo_mask" not in group:
                group["apollo_mask"] = opt._apollo_mask(group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        backfill_group_defaults(
            self, scale_front=False, norm_growth_limit=1.01, convention="paper", impl="auto", distributed="auto"
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; ``closure`` (re-evaluating the loss) is called once, with grad enabled."""
        loss = run_closure(closure)
        topo, owners = self._topology_and_owners()
        shared = []  # (group, param, seed of a refreshed projection or None) stepped by their owners
        index = 0  # 1-based position in the optimizer: the projection's first seed
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            ap, ag, am, av, steps = [], [], [], [], []
            for p, on_apollo in zip(group["params"], group["apollo_mask"]):
                index += 1
                if p.grad is None:
                    continue
                reject_sparse_grad(p, type(self).__name__)
                state = self.state[p]
                if not on_apollo:
                    adamw_state_(state, p)
                    state["step"] += 1
                    ap.append(p)
                    ag.append(p.grad)
                    am.append(state["exp_avg"])
                    av.append(state["exp_avg_sq"])
                    steps.append(state["step"])
                    continue
                if id(p) in owners:
                    if "step" not in state:  # every rank counts the steps and advances the seed
                        state["step"] = 0
                        state["seed"] = index
                    refresh = None
                    if state["step"] % group["update_proj_gap"] == 0:
                        refresh = state["seed"]
                        state["seed"] = next_projection_seed(state["seed"])
                    state["step"] += 1
                    shared.append((group, p, refresh))
                    continue
                dt = compute_dtype(p)
                if "step" not in state:
                    state["step"] = 0
                    state["seed"] = index
                if state["step"] % group["update_proj_gap"] == 0 or "proj" not in state:
                    state["proj"] = random_projection(p.shape, group["rank"], state["seed"], dtype=dt, device=p.device)
                    state["seed"] = next_projection_seed(state["seed"])
                if "exp_avg" not in state:
                    m, n = p.shape
                    low_rank = (m, group["rank"]) if m >= n else (group["rank"], n)
                    state["exp_avg"] = torch.zeros(low_rank, dtype=dt, device=p.device)
                    state["exp_avg_sq"] = torch.zeros(low_rank, dtype=dt, device=p.device)
                state["step"] += 1
                new_norm = apollo_update_(
                    p,
                    p.grad,
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    state["proj"],
                    step=state["step"],
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    prev_norm=state.get("update_norm"),
                    **self._direction_options(group),
                )
                if new_norm is not None:
                    state["update_norm"] = new_norm
            side = adamw_side if group["convention"] == "paper" else adamw_reference_side
            side(
                ap,
                ag,
                am,
                av,
                steps,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                impl=group["impl"],
                cls=type(self).__name__,
            )
        if shared:
            self._owner_step(topo, owners, shared)
        return loss

    # --- FSDP2 shards and DDP replicas (lightning_opt.optim.distributed) ------------------------

    def _topology_and_owners(self) -> tuple[Topology, dict[int, int]]:
        """The step's topology and the owner of every APOLLO matrix of a ``distributed="auto"`` group."""
        auto = [
            (g, p)
            for g in self.param_groups
            if g["distributed"] == "auto"
            for p, on in zip(g["params"], g["apollo_mask"])
            if on
        ]
        topo = topology([p for _, p in auto])
        if topo.mode == "single":
            return topo, {}
        items = [(p, (tuple(p.shape), g["rank"]), apollo_cost(p.shape, g["rank"])) for g, p in auto]
        return topo, cached_owners(self, topo, items)

    @staticmethod
    def _direction_options(group: dict[str, Any]) -> dict[str, Any]:
        """The group's options :func:`apollo_direction` takes (besides the state and the step)."""
        keys = ("eps", "scale", "scale_type", "scale_front", "norm_growth_limit", "convention")
        return {"beta1": group["betas"][0], "beta2": group["betas"][1], **{k: group[k] for k in keys}}

    @staticmethod
    def _layout(shape: Sequence[int], group: dict[str, Any]) -> tuple[tuple[int, int], tuple[int, int]]:
        m, n = shape
        r = group["rank"]
        return ((m, r), (r, n)) if m >= n else ((r, n), (m, r))  # (moments, projection)

    def _owner_state(self) -> tuple[Topology, list[OwnerStateEntry]]:
        topo, owners = self._topology_and_owners()
        entries = []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                if id(p) not in owners or state.get("step", 0) == 0:
                    continue
                moments, proj = self._layout(p.shape, group)
                layout: dict[str, Any] = {"exp_avg": moments, "exp_avg_sq": moments, "proj": proj}
                if group["norm_growth_limit"] is not None:
                    layout["update_norm"] = ()
                entries.append(OwnerStateEntry(p, owners[id(p)], layout, compute_dtype(p), local(p).device))
        return topo, entries

    def _owner_step(
        self, topo: Topology, owners: dict[int, int], shared: list[tuple[dict[str, Any], Tensor, int | None]]
    ) -> None:
        """:func:`apollo_direction` of each matrix whole on its owner, :func:`apollo_apply_` on every rank's rows."""
        name = type(self).__name__
        jobs = []
        for group, p, refresh in shared:
            state = self.state[p]
            dt = compute_dtype(p)

            def compute(full: list[Tensor], state=state, group=group, refresh=refresh, dt=dt) -> list[Tensor]:
                g = full[0]
                moments, _ = self._layout(g.shape, group)
                if refresh is not None:
                    state["proj"] = random_projection(g.shape, group["rank"], refresh, dtype=dt, device=g.device)
                elif "proj" not in state:
                    raise RuntimeError(f"{name}: the owner of a matrix has no projection; its state was not loaded")
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros(moments, dtype=dt, device=g.device)
                    state["exp_avg_sq"] = torch.zeros(moments, dtype=dt, device=g.device)
                update, new_norm = apollo_direction(
                    g,
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    state["proj"],
                    step=state["step"],
                    prev_norm=state.get("update_norm"),
                    **self._direction_options(group),
                )
                if new_norm is not None:
                    state["update_norm"] = new_norm
                return [update]

            grad = local(p.grad).to(dt)
            jobs.append(MatrixJob(owners[id(p)], [grad], p.shape[0], [tuple(p.shape)], compute))
        for (group, p, _), (update,) in zip(shared, owner_compute(topo, jobs)):
            beta1, beta2 = group["betas"]
            apollo_apply_(
                local(p),
                update,
                step=self.state[p]["step"],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                convention=group["convention"],
            )


class APOLLOMini(APOLLO):
    """APOLLO-Mini: rank-1 projection with tensor-wise scaling and ``scale=128``.

    The arguments are :class:`APOLLO`'s except ``rank`` (fixed to 1) and ``scale_type`` (fixed to
    ``"tensor"``); ``scale`` defaults to ``128`` (the paper's; ``sqrt(128)`` compensates the tiny
    norm of a rank-1 projection).

    Raises:
        ValueError: as :class:`APOLLO`.

    Example:
        >>> opt = build_optimizer(model, "apollo_mini", lr=1e-2, target_modules=[r"attn", r"mlp"])

    Paper: Zhu et al., arXiv:2412.05270 (APOLLO-Mini, section 4).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        scale: float = 128.0,
        update_proj_gap: int = 200,
        proj: Proj = "random",
        target_modules: Sequence[str] | str | None = None,
        scale_front: bool = False,
        norm_growth_limit: float | None = 1.01,
        convention: Convention = "paper",
        impl: Impl = "auto",
        distributed: Distributed = "auto",
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            rank=1,
            scale=scale,
            scale_type="tensor",
            update_proj_gap=update_proj_gap,
            proj=proj,
            target_modules=target_modules,
            scale_front=scale_front,
            norm_growth_limit=norm_growth_limit,
            convention=convention,
            impl=impl,
            distributed=distributed,
        )


_PAPER = "Zhu et al., arXiv:2412.05270"
register(
    OptimInfo(
        name="apollo",
        cls=APOLLO,
        description="APOLLO: AdamW moments of a random low-rank projection scale the raw gradient (channel-wise)",
        paper=_PAPER,
        default_lr=1e-2,
    )
)
register(
    OptimInfo(
        name="apollo_mini",
        cls=APOLLOMini,
        description="APOLLO-Mini: rank-1 projection, tensor-wise gradient scaling (SGD-like memory)",
        paper=_PAPER,
        default_lr=1e-2,
    )
)
register_alias("apollo_adamw", "apollo", source="huggingface")
