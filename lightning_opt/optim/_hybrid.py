"""What the hybrid matrix optimizers (Muon, APOLLO) share: the matrix-vs-AdamW routing and the AdamW side.

Infrastructure (registers nothing; the leading underscore keeps the family auto-importer off it).

- :func:`route_matrices` decides, once per param group, which parameters take the matrix rule and
  which take AdamW (a group key override, the shape, name regexes), so both optimizers split a model
  the same way and store the split in the group.
- :func:`adamw_side` steps the AdamW side of a group over tensor lists, by ``impl``: ``for_loop``
  (:func:`~lightning_opt.optim.base.adamw_update_` per tensor, the reference), ``foreach``
  (``torch._foreach_*`` ops), ``fused`` (one call of the C kernel ``kernels/csrc/adamw.c`` per
  bucket) and ``triton`` (:mod:`lightning_opt.kernels.triton_adamw`, imported when first used;
  CUDA, or the CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_opt.optim.base import adamw_update_, check_flag
from lightning_opt.optim.distributed import check_shardable
from lightning_opt.optim.engine import dispatch
from lightning_opt.optim.precision import LOW_PRECISION, compute_dtype

__all__ = ["ADAMW_SIDE_IMPLS", "adamw_side", "adamw_state_", "compile_patterns", "route_matrices"]


def compile_patterns(cls: str, key: str, patterns: Sequence[str]) -> tuple[str, ...]:
    """``patterns`` as a tuple of valid regexes, or ``ValueError`` naming ``cls`` and ``key``.

    A single string is refused (iterating it would give one-character regexes).
    """
    if isinstance(patterns, str):
        raise ValueError(f"{cls}({key}={patterns!r}) is invalid; pass a list of regexes, e.g. [{patterns!r}]")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise ValueError(f"{cls}({key}=[..., {pattern!r}]) is invalid: {err}") from err
    return tuple(patterns)


def route_matrices(
    params: Sequence[Tensor],
    names: Sequence[str] | None,
    *,
    cls: str,
    override_key: str,
    override: Any = None,
    exclude: Sequence[str] = (),
    include: Sequence[str] | None = None,
    flatten_conv: bool | None = False,
    matrix_hint: str = "only matrices can be orthogonalized",
    distributed: str = "auto",
) -> list[bool]:
    """Which of ``params`` take the matrix rule (``True``) and which the AdamW side (``False``).

    1. ``override`` (a group key such as ``use_muon``, named ``override_key``) ``True``/``False``
       decides for the whole group; ``True`` on a tensor that is not a matrix is an error.
    2. Otherwise a tensor is a matrix if it is 2-D, or has more than 2 dims and ``flatten_conv``
       (viewed as ``(dim0, -1)``); a matrix takes the matrix rule if its name matches one of
       ``include`` (when given; an unnamed tensor then does not) or none of ``exclude``
       (``re.search``; an unnamed tensor then does).

    Args:
        params, names: the group's tensors and their names (``param_names``; ``None`` without).
        cls: the optimizer's name, for errors.
        override_key, override: the group key and its value (``None``: not set).
        exclude: regexes of matrices sent to AdamW (embeddings, the output head).
        include: regexes selecting the matrices (``None``: every matrix not excluded).
        flatten_conv: treat tensors with more than 2 dims as matrices; ``None`` where the
            optimizer has no such option (they always go to AdamW).
        matrix_hint: why a non-matrix cannot take the rule, for the override error.
        distributed: the group's ``distributed`` option (DTensor matrices need ``"auto"``).

    Raises:
        ValueError: ``override`` not a bool, or ``True`` on a tensor that is not a matrix.
        NotImplementedError: a DTensor routed to the matrix rule whose layout is not FSDP2's
            (:func:`~lightning_opt.optim.distributed.check_shardable`).
        ValueError: a DTensor routed to the matrix rule with ``distributed="local"``.
    """
    if override is not None:
        check_flag(cls, override_key, override)
    include_re = None if include is None else [re.compile(p) for p in include]
    exclude_re = [re.compile(p) for p in exclude]
    mask = []
    for i, p in enumerate(params):
        name = names[i] if names is not None and i < len(names) else None
        matrix = p.ndim == 2 or (p.ndim > 2 and bool(flatten_conv))
        if override is not None:
            if override and not matrix:
                hint = "set flatten_conv=True" if p.ndim > 2 and flatten_conv is not None else matrix_hint
                raise ValueError(
                    f"{cls}: param group has {override_key}=True but {name or f'parameter {i}'} has shape "
                    f"{tuple(p.shape)}; {hint}"
                )
            on = bool(override)
        elif not matrix:
            on = False
        elif include_re is not None:
            on = name is not None and any(pat.search(name) for pat in include_re)
        else:
            on = not (name is not None and any(pat.search(name) for pat in exclude_re))
        if on:
            check_shardable(cls, p, name, distributed=distributed)
        mask.append(on)
    return mask


def adamw_state_(state: dict[str, Any], p: Tensor) -> None:
    """Create the AdamW-side state of ``p`` on first use: ``step = 0`` and float32-or-wider moments."""
    if "exp_avg" not in state:
        dt = compute_dtype(p)
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)


def _adamw_for_loop(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay) -> None:
    for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        adamw_update_(p, g, m, v, s, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)


def _adamw_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay) -> None:
    low = params[0].dtype in LOW_PRECISION
    g = [x.float() for x in grads] if low else [x.to(p.dtype) for x, p in zip(grads, params)]
    torch._foreach_lerp_(exp_avgs, g, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, g, g, value=1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [math.sqrt(1 - beta2**s) for s in steps])
    torch._foreach_add_(denom, eps)
    p32 = [p.float() for p in params] if low else params
    if weight_decay != 0:
        torch._foreach_mul_(p32, 1 - lr * weight_decay)
    torch._foreach_addcdiv_(p32, exp_avgs, denom, [-lr / (1 - beta1**s) for s in steps])
    if low:
        torch._foreach_copy_(params, p32)


def _adamw_fused(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay) -> None:
    from lightning_opt.kernels import cpu

    # per-tensor bias corrections, computed here in double as adamw_update_ does: (lr / bc1, sqrt(bc2))
    per_tensor = []
    for s in steps:
        per_tensor += [lr / (1 - beta1**s), math.sqrt(1 - beta2**s)]
    cpu.launch(
        "adamw",
        "adamw",
        [params, grads, exp_avgs, exp_avg_sqs],
        [lr, beta1, beta2, eps, weight_decay, *per_tensor],
        state_dtype=exp_avgs[0].dtype,
    )


def _adamw_triton(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay) -> None:
    from lightning_opt.kernels.triton_adamw import adamw_triton_

    adamw_triton_(
        params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay
    )


#: the AdamW side's implementations, by ``impl`` name (``for_loop`` is the reference)
ADAMW_SIDE_IMPLS = {
    "for_loop": _adamw_for_loop,
    "foreach": _adamw_foreach,
    "fused": _adamw_fused,
    "triton": _adamw_triton,
}


def adamw_side(
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
    cls: str = "AdamW side",
) -> None:
    """The AdamW side of a hybrid optimizer over tensor lists: :func:`adamw_update_` for each tensor.

    Args:
        params, grads: the tensors and their gradients.
        exp_avgs, exp_avg_sqs: their moments (float32 for bf16/fp16 parameters, see :func:`adamw_state_`).
        steps: the 1-based count of this update, per tensor (already incremented).
        lr, beta1, beta2, eps, weight_decay: torch's AdamW (``p *= 1 - lr wd``; eps added to
            ``sqrt(v / bc2)``).
        impl: ``"auto"`` (the fused C kernel on the CPU; Triton on CUDA where it works, else
            ``foreach``), ``"for_loop"``, ``"foreach"``, ``"fused"`` or ``"triton"``; tensors are
            bucketed by (device, dtype) and each bucket runs the chosen impl
            (:func:`lightning_opt.optim.engine.dispatch`).
        cls: the optimizer's name, for errors.

    The fused kernel takes the per-tensor step counts as two doubles per tensor appended to its
    float hyperparameters (``lr / (1 - beta1^t)`` and ``sqrt(1 - beta2^t)``, computed in Python as
    the reference does), so one launch covers tensors at different steps.
    """
    dispatch(
        cls,
        "adamw",
        impl,
        ADAMW_SIDE_IMPLS,
        {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "steps": steps},
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
    )
