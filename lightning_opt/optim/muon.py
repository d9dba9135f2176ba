"""Muon: momentum orthogonalized by Newton-Schulz for 2-D hidden weights, AdamW for the rest.

Registered as ``muon`` (DeepSpeed's ``MuonOptimizer`` resolves to it). One :class:`Muon` object
steps both sides, so Lightning's automatic optimization sees a single optimizer.

The Muon step is three phases, plain functions of tensors a sharded runner can call separately:
:func:`muon_momentum_` (elementwise, on a local shard), :func:`muon_direction` (Newton-Schulz: needs
the whole matrix, or a stack of same-shaped matrices) and :func:`muon_apply_` (elementwise).
:func:`muon_update_` is their composition for one matrix (the reference, ``impl="for_loop"``);
:func:`muon` steps tensor lists, with ``impl="foreach"`` orthogonalizing all matrices of one shape
in one batched Newton-Schulz chain. The AdamW side is :func:`lightning_opt.optim._hybrid.adamw_side`.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Literal, Union, get_args

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_opt.optim._hybrid import adamw_side, adamw_state_, compile_patterns, route_matrices
from lightning_opt.optim.base import (
    DEFAULT_ADAMW_PATTERNS,
    OptionCheck,
    adamw_update_,
    backfill_group_defaults,
    check_arg,
    check_betas,
    check_flag,
    check_options,
    check_param_group,
    compute_dtype,
    is_int,
    is_number,
    keep_state_dtype_on_load,
    reject_sparse_grad,
    run_closure,
)
from lightning_opt.optim.distributed import (
    Distributed,
    MatrixJob,
    assign_owners,
    check_distributed,
    local,
    owner_compute,
    topology,
)
from lightning_opt.optim.engine import Impl, dispatch
from lightning_opt.optim.layout import guard_param_layout
from lightning_opt.optim.registry import OptimInfo, register, register_alias

__all__ = [
    "MUON_IMPLS",
    "Muon",
    "NS_COEFFICIENTS",
    "NS_SCHEDULES",
    "POLAR_EXPRESS",
    "adamw_update_",
    "adjusted_lr",
    "default_ns_dtype",
    "fast_bf16_matmul",
    "muon",
    "muon_apply_",
    "muon_direction",
    "muon_momentum_",
    "muon_update_",
    "newton_schulz_error",
    "newton_schulz_flops",
    "ns_schedule",
    "orthogonality_error",
    "zeropower_via_newtonschulz",
]

AdjustLR = Literal["original", "match_rms_adamw"]
Triple = tuple[float, float, float]
#: ``ns_coefficients``: one ``(a, b, c)`` for every step, one triple per step, or a schedule's name
NSCoefficients = Union[Triple, Sequence[Triple], Literal["keller", "polar_express"]]

#: Keller Jordan's quintic coefficients (maximal slope at zero), torch's defaults too
NS_COEFFICIENTS: Triple = (3.4445, -4.7750, 2.0315)

# Polar Express, degree 5: the per-iteration minimax-optimal coefficients published in Amsel, Persson,
# Musco & Gower, "The Polar Express: Optimal Matrix Sign Methods and Their Application to the Muon
# Algorithm", arXiv:2505.16932, Algorithm 1 (steps past the 8th repeat the last triple).
_POLAR_EXPRESS_PUBLISHED: tuple[Triple, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
#: the paper's safety factor: every polynomial but the last is evaluated at ``x / 1.01`` and the
#: input is normalized by ``1.01 ||X||_F``, so bf16 rounding cannot push a singular value past
#: the interval the polynomials were optimized on
POLAR_EXPRESS_SAFETY = 1.01
#: Polar Express coefficients with the safety factor folded in, as Algorithm 1 runs them
POLAR_EXPRESS: tuple[Triple, ...] = tuple(
    (a / POLAR_EXPRESS_SAFETY, b / POLAR_EXPRESS_SAFETY**3, c / POLAR_EXPRESS_SAFETY**5)
    for a, b, c in _POLAR_EXPRESS_PUBLISHED[:-1]
) + (_POLAR_EXPRESS_PUBLISHED[-1],)
#: the named schedules ``ns_coefficients`` takes: (per-step triples, normalization factor)
NS_SCHEDULES: dict[str, tuple[tuple[Triple, ...], float]] = {
    "keller": ((NS_COEFFICIENTS,), 1.0),
    "polar_express": (POLAR_EXPRESS, POLAR_EXPRESS_SAFETY),
}

# Keller's aux-Adam lr (3e-4) over his Muon lr (0.02): the AdamW side's lr ratio for "original"
_ORIGINAL_ADAMW_RATIO = 3e-4 / 0.02
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64, "float16": torch.float16}
# /proc/cpuinfo flags of CPUs whose bf16 matmuls beat float32 (AVX512-BF16 dot products, AMX tiles;
# "bf16" is the Arm feature name)
_FAST_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=None)
def fast_bf16_matmul(device_type: str) -> bool:
    """Whether bfloat16 matmuls are fast (at least float32's speed) on ``device_type``; cached.

    CUDA: yes (tensor cores). CPU: only with AVX512-BF16 or AMX-BF16 (Arm: the ``bf16`` feature) in
    /proc/cpuinfo; ``torch.backends.cpu.get_cpu_capability()`` names the vector ISA (AVX2, AVX512)
    but not bf16 support, so it only confirms AVX512 is usable. On an AVX2-only CPU torch's bf16
    matmul is ~100x slower than float32. Other devices: no.
    """
    if device_type == "cuda":
        return True
    if device_type != "cpu":
        return False
    if not _cpu_flags() & _FAST_BF16_FLAGS:
        return False
    capability = torch.backends.cpu.get_cpu_capability()
    # an x86 build running below AVX512 (ATEN_CPU_CAPABILITY=avx2) takes the slow bf16 kernels
    return not capability.startswith(("AVX2", "DEFAULT", "NO AVX"))


def default_ns_dtype(param: Tensor) -> torch.dtype:
    """The Newton-Schulz dtype ``ns_dtype=None`` picks for ``param``.

    bfloat16 where bf16 matmuls are fast (:func:`fast_bf16_matmul`: CUDA, AVX512-BF16/AMX CPUs),
    except for float64 parameters off CUDA (float64: asked-for precision); float32 (float64 for
    float64 parameters) elsewhere.
    """
    dt = compute_dtype(param)
    if fast_bf16_matmul(param.device.type) and (dt != torch.float64 or param.device.type == "cuda"):
        return torch.bfloat16
    return torch.promote_types(dt, torch.float32)


def _schedule_problem(coefficients: Any, steps: int) -> str | None:
    """Why ``coefficients`` is not a valid ``ns_coefficients`` for ``steps`` iterations, or ``None``."""
    if isinstance(coefficients, str):
        return None if coefficients in NS_SCHEDULES else f"expected one of {sorted(NS_SCHEDULES)}"
    hint = f"expected three finite floats (a, b, c), one (a, b, c) per step, or one of {sorted(NS_SCHEDULES)}"
    if not isinstance(coefficients, (tuple, list)) or not coefficients:
        return hint
    if all(is_number(c) for c in coefficients):
        return None if len(coefficients) == 3 else hint
    if not all(isinstance(t, (tuple, list)) and len(t) == 3 and all(is_number(c) for c in t) for t in coefficients):
        return hint
    if len(coefficients) != steps:
        return f"it has {len(coefficients)} per-step triples but ns_steps={steps}; give one per step"
    return None


def ns_schedule(coefficients: NSCoefficients, steps: int) -> tuple[tuple[Triple, ...], float]:
    """The ``steps`` per-iteration ``(a, b, c)`` triples and the normalization factor of ``coefficients``.

    One triple applies to every step; a list of triples gives one per step (its length must be
    ``steps``); a name (:data:`NS_SCHEDULES`) takes its first ``steps`` triples, the last repeated
    past its end (Polar Express's rule), and its own normalization factor (1 for the others).

    Raises:
        ValueError: an unknown name, a malformed triple, or a per-step list of the wrong length.
    """
    problem = _schedule_problem(coefficients, steps)
    if problem is not None:
        raise ValueError(f"ns_coefficients={coefficients!r} is invalid; {problem}")
    if isinstance(coefficients, str):
        triples, factor = NS_SCHEDULES[coefficients]
        return tuple(triples[min(i, len(triples) - 1)] for i in range(steps)), factor
    if all(is_number(c) for c in coefficients):
        return (tuple(float(c) for c in coefficients),) * steps, 1.0
    return tuple(tuple(float(c) for c in t) for t in coefficients), 1.0


def zeropower_via_newtonschulz(
    G: Tensor,
    steps: int = 5,
    dtype: torch.dtype = torch.float32,
    *,
    coefficients: NSCoefficients = NS_COEFFICIENTS,
    eps: float = 1e-7,
) -> Tensor:
    """Approximately orthogonalize the matrix ``G`` (``U S V^T -> U S' V^T``, ``S'`` in ~[0.7, 1.2]).

    Quintic Newton-Schulz (Keller Jordan 2024): ``X = G / max(s ||G||_F, eps)`` (transposed so that
    ``X X^T`` is the smaller Gram matrix; ``s`` is 1, or the schedule's safety factor), then for each
    step's ``(a, b, c)``: ``A = X X^T``, ``X <- a X + (b A + c A^2) X``. A 3-D ``G`` is a stack of
    same-shaped matrices, each normalized by its own norm and iterated in one batched chain
    (``baddbmm``): the result equals orthogonalizing them one at a time up to rounding.

    Args:
        G: a 2-D tensor, or a 3-D ``[k, m, n]`` stack; not modified.
        steps: iterations (default 5).
        dtype: dtype the iteration runs in (see :func:`default_ns_dtype`).
        coefficients: ``(a, b, c)`` for every step (default Keller's ``(3.4445, -4.7750, 2.0315)``),
            one triple per step, or a schedule name, ``"polar_express"`` (:func:`ns_schedule`).
        eps: lower bound of the (scaled) Frobenius norm used for normalization (default ``1e-7``).

    Returns:
        A new tensor of ``G``'s shape in ``dtype``.

    Raises:
        ValueError: ``G`` is not 2-D or 3-D; invalid ``coefficients``.
    """
    if G.ndim not in (2, 3):
        raise ValueError(f"zeropower_via_newtonschulz needs a 2-D matrix or a 3-D stack, got shape {tuple(G.shape)}")
    schedule, factor = ns_schedule(coefficients, steps)
    X = G.to(dtype, copy=True)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    if X.ndim == 2:
        norm = X.norm()
        mm, mm_add = torch.mm, torch.addmm
    else:
        norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
        mm, mm_add = torch.bmm, torch.baddbmm
    if factor != 1.0:
        norm = norm * factor
    X.div_(norm.clamp(min=eps))
    for a, b, c in schedule:
        A = mm(X, X.mT)
        B = mm_add(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = mm_add(X, B, X, beta=a)  # a X + B X
    return X.mT if tall else X


def newton_schulz_flops(m: int, n: int, steps: int = 5) -> int:
    """Multiply-add flops (2 per multiply-add) of ``steps`` iterations on an ``m x n`` matrix.

    With ``r = min(m, n)``, ``k = max(m, n)``: ``X X^T`` is ``2 r^2 k``, ``A A`` is ``2 r^3``,
    ``B X`` is ``2 r^2 k`` per step; every schedule (Keller's, Polar Express) costs the same per step.
    """
    r, k = min(m, n), max(m, n)
    return steps * (4 * r * r * k + 2 * r**3)


def orthogonality_error(X: Tensor) -> float:
    """``max_i |sigma_i(X) - 1|`` over the ``min(m, n)`` singular values of ``X`` (float64 SVD).

    0 for an exactly (semi-)orthogonal ``X``; Keller's 5-step quintic leaves ~0.3 by design.
    """
    s = torch.linalg.svdvals(X.double())
    return float((s - 1).abs().max())


def newton_schulz_error(
    shape: tuple[int, int] = (256, 1024),
    *,
    steps: int = 5,
    coefficients: NSCoefficients = NS_COEFFICIENTS,
    dtype: torch.dtype = torch.float32,
    decay: float = 0.5,
    seed: int = 0,
) -> float:
    """:func:`orthogonality_error` of Newton-Schulz on a random gradient-like matrix (for benchmarks).

    The matrix is ``U diag(s) V^T`` with Haar-random ``U, V`` and a power-law spectrum
    ``s_i = i^-decay`` (gradients have a few large directions and a long tail; ``decay=0.5`` spans
    a condition number of ``sqrt(min(m, n))``), built in float64 from ``seed``.
    """
    m, n = shape
    r = min(m, n)
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
    s = torch.arange(1, r + 1, dtype=torch.float64).pow(-decay)
    G = (U * s) @ V.T
    return orthogonality_error(zeropower_via_newtonschulz(G.to(dtype), steps, dtype, coefficients=coefficients))


def adjusted_lr(lr: float, shape: Sequence[int], adjust_lr_fn: AdjustLR) -> float:
    """The lr applied to the orthogonalized update of an ``A x B`` matrix.

    ``"original"`` (Keller): ``lr * sqrt(max(1, A / B))``. ``"match_rms_adamw"`` (Moonlight, Liu et al.
    2025): ``lr * 0.2 * sqrt(max(A, B))``, an update RMS of about 0.2 like AdamW's, so AdamW's lr and
    weight decay carry over.
    """
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    return lr * 0.2 * math.sqrt(max(rows, cols))


def _matrix_shape(t: Tensor) -> tuple[int, int]:
    rows = t.size(0)
    return rows, t.numel() // rows if rows else 0


def muon_momentum_(grad: Tensor, momentum_buffer: Tensor, *, momentum: float, nesterov: bool) -> Tensor:
    """Phase 1 (elementwise, shard-local): ``B <- lerp(B, g, 1 - mu)``; the update to orthogonalize.

    ``momentum_buffer`` (in the parameter's math dtype, float32 for bf16/fp16) is updated in place.

    Returns:
        ``lerp(g, B, mu)`` (Nesterov) or ``B`` itself, viewed as a ``(dim0, -1)`` matrix.
    """
    shape = _matrix_shape(momentum_buffer)
    g = grad.to(momentum_buffer.dtype).reshape(shape)
    buf = momentum_buffer.view(shape)
    buf.lerp_(g, 1 - momentum)
    return g.lerp(buf, momentum) if nesterov else buf


def muon_direction(
    update: Tensor,
    *,
    ns_steps: int,
    ns_coefficients: NSCoefficients,
    eps: float,
    ns_dtype: torch.dtype,
) -> Tensor:
    """Phase 2 (whole matrix): the orthogonalized direction, Newton-Schulz of ``update``.

    ``update`` is one ``(m, n)`` matrix or a ``[k, m, n]`` stack of them (one batched chain).
    """
    return zeropower_via_newtonschulz(update, ns_steps, ns_dtype, coefficients=ns_coefficients, eps=eps)


def muon_apply_(
    param: Tensor,
    ortho: Tensor,
    *,
    lr: float,
    weight_decay: float,
    adjust_lr_fn: AdjustLR,
    matrix_shape: tuple[int, int] | None = None,
) -> None:
    """Phase 3 (elementwise): ``p <- p (1 - lr wd)``; ``p <- p - adjusted_lr(lr) O``, in place.

    The decay uses the unadjusted lr, as in torch and Keller; the lr adjustment uses the shape of
    the whole ``(dim0, -1)`` matrix: ``param``'s, or ``matrix_shape`` when ``param`` is a shard's
    rows (the owner-compute path). A bf16/fp16 parameter is decayed and updated in float32 and
    rounded once.
    """
    dt = compute_dtype(param)
    step = adjusted_lr(lr, matrix_shape or _matrix_shape(param), adjust_lr_fn)
    # a bf16/fp16 parameter is decayed and updated in float32 and rounded once, not once per op
    p = param if param.dtype == dt else param.to(dt)
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    p.add_(ortho.reshape(param.shape), alpha=-step)
    if p is not param:
        param.copy_(p)


def muon_update_(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_steps: int,
    ns_coefficients: NSCoefficients,
    eps: float,
    ns_dtype: torch.dtype,
    adjust_lr_fn: AdjustLR,
) -> None:
    """One Muon step for one matrix (or conv weight, viewed as ``(out, -1)``), in place (the reference).

    ``B <- lerp(B, g, 1 - mu)``; ``U = lerp(g, B, mu)`` (Nesterov) or ``B``; ``O = NS(U)``;
    ``p <- p (1 - lr wd)``; ``p <- p - adjusted_lr(lr) O``: :func:`muon_momentum_`,
    :func:`muon_direction`, :func:`muon_apply_`. The momentum and the arithmetic are float32 for
    bf16/fp16 parameters, which are rounded once per step (after both the decay and the update).
    """
    update = muon_momentum_(grad, momentum_buffer, momentum=momentum, nesterov=nesterov)
    ortho = muon_direction(update, ns_steps=ns_steps, ns_coefficients=ns_coefficients, eps=eps, ns_dtype=ns_dtype)
    muon_apply_(param, ortho, lr=lr, weight_decay=weight_decay, adjust_lr_fn=adjust_lr_fn)


def _muon_for_loop(params, grads, momentum_buffers, *, ns_dtype, **hp: Any) -> None:
    for p, g, b in zip(params, grads, momentum_buffers):
        muon_update_(p, g, b, ns_dtype=ns_dtype or default_ns_dtype(p), **hp)


def _muon_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_steps: int,
    ns_coefficients: NSCoefficients,
    eps: float,
    ns_dtype: torch.dtype | None,
    adjust_lr_fn: AdjustLR,
) -> None:
    # one bucket: one device and dtype, so one math dtype and one default ns dtype
    dt = momentum_buffers[0].dtype
    ns_dtype = ns_dtype or default_ns_dtype(params[0])
    g = [x.to(dt) for x in grads]
    torch._foreach_lerp_(momentum_buffers, g, 1 - momentum)
    updates = torch._foreach_lerp(g, momentum_buffers, momentum) if nesterov else momentum_buffers
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(params):
        by_shape.setdefault(_matrix_shape(p), []).append(i)
    orthos: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
    hp = {"ns_steps": ns_steps, "ns_coefficients": ns_coefficients, "eps": eps, "ns_dtype": ns_dtype}
    for shape, idx in by_shape.items():
        if len(idx) == 1:
            orthos[idx[0]] = muon_direction(updates[idx[0]].reshape(shape), **hp)
            continue
        # one batched chain per shape: k small matmuls become one bmm
        stacked = muon_direction(torch.stack([updates[i].reshape(shape) for i in idx]), **hp)
        for j, i in enumerate(idx):
            orthos[i] = stacked[j]
    low = params[0].dtype != dt
    p32 = [p.to(dt) for p in params] if low else params
    if weight_decay != 0:
        torch._foreach_mul_(p32, 1 - lr * weight_decay)
    for shape, idx in by_shape.items():
        step = adjusted_lr(lr, shape, adjust_lr_fn)
        torch._foreach_add_([p32[i] for i in idx], [orthos[i].reshape(params[i].shape) for i in idx], alpha=-step)
    if low:
        torch._foreach_copy_(params, p32)


def muon_owner_compute_(groups: Sequence[tuple[dict[str, Any], list[Tensor], list[Tensor], list[Tensor]]]) -> None:
    """The Muon side of ``(group, params, grads, momentum_buffers)`` on FSDP2 shards or DDP replicas.

    :func:`muon_momentum_` on this rank's rows, :func:`muon_direction` of each whole matrix on its
    owner (:func:`lightning_opt.optim.distributed.owner_compute`: one packed exchange for all
    groups, owners by :func:`~lightning_opt.optim.distributed.assign_owners` with the cost
    :func:`newton_schulz_flops`), :func:`muon_apply_` on this rank's rows. The math is
    :func:`muon_update_`'s, one matrix at a time (``impl`` does not batch here).
    """
    topo = topology([p for _, ps, _, _ in groups for p in ps])
    entries = []
    for group, params, grads, buffers in groups:
        for p, g, b in zip(params, grads, buffers):
            entries.append((group, p, g, b, _matrix_shape(p)))
    owners, _ = assign_owners(
        [newton_schulz_flops(*shape, group["ns_steps"]) for group, *_, shape in entries],
        [shape for *_, shape in entries],
        topo.world,
    )
    jobs = []
    for (group, p, g, b, shape), owner in zip(entries, owners):
        lb = local(b)
        update = muon_momentum_(local(g), lb, momentum=group["momentum"], nesterov=group["nesterov"])
        hp = {
            "ns_steps": group["ns_steps"],
            "ns_coefficients": group["ns_coefficients"],
            "eps": group["eps"],
            "ns_dtype": group["ns_dtype"] or default_ns_dtype(local(p)),
        }

        def compute(full: list[Tensor], hp: dict[str, Any] = hp, dt: torch.dtype = lb.dtype) -> list[Tensor]:
            return [muon_direction(full[0], **hp).to(dt)]

        jobs.append(MatrixJob(owner, [update.reshape(lb.size(0), shape[1])], shape[0], [shape], compute))
    for (group, p, _, _, shape), (ortho,) in zip(entries, owner_compute(topo, jobs)):
        muon_apply_(
            local(p),
            ortho,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            adjust_lr_fn=group["adjust_lr_fn"],
            matrix_shape=shape,
        )


#: Muon's matrix-side implementations, by ``impl`` name (``for_loop`` is the reference)
MUON_IMPLS = {"for_loop": _muon_for_loop, "foreach": _muon_foreach}


def muon(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_steps: int,
    ns_coefficients: NSCoefficients,
    eps: float,
    ns_dtype: torch.dtype | None,
    adjust_lr_fn: AdjustLR,
    impl: str = "auto",
) -> None:
    """The Muon side over tensor lists (the functional API): :func:`muon_update_` for every matrix.

    ``impl``: ``"for_loop"`` (one matrix at a time, the reference), ``"foreach"`` (the momentum and
    the apply as ``torch._foreach_*`` ops, and one batched Newton-Schulz chain per matrix shape) or
    ``"auto"`` (the engine's rule: ``"foreach"`` on CUDA, where batching saves launches;
    ``"for_loop"`` on the CPU, where the batched chain measured no faster: 92 vs 84 ms per step on
    24 x 256^2 matrices, 2 AVX2 threads, 2026-12-01). ``ns_dtype=None`` picks :func:`default_ns_dtype` per (device, dtype)
    bucket.
    """
    dispatch(
        "Muon",
        "muon",
        impl,
        MUON_IMPLS,
        {"params": params, "grads": grads, "momentum_buffers": momentum_buffers},
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        nesterov=nesterov,
        ns_steps=ns_steps,
        ns_coefficients=ns_coefficients,
        eps=eps,
        ns_dtype=ns_dtype,
        adjust_lr_fn=adjust_lr_fn,
    )


def _resolve_dtype(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        if value is not None and value not in _DTYPES.values():  # float8 has no matmul to iterate with
            raise ValueError(f"Muon(ns_dtype={value!r}) is invalid; expected None or one of {sorted(_DTYPES)}")
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"Muon(ns_dtype={value!r}) is invalid; expected None, a torch dtype or one of {sorted(_DTYPES)}")


def _checked(cls: str, key: str, value: Any, ok: bool, hint: str) -> Any:
    check_arg(cls, key, value, ok, hint)
    return value


def _store_coefficients(value: Any, steps: int) -> Any:
    # checked at construction, stored plainly: a name, a triple, or a tuple of per-step triples
    problem = _schedule_problem(value, steps)
    check_arg("Muon", "ns_coefficients", value, problem is None, problem or "")
    if isinstance(value, str):
        return value
    if all(is_number(c) for c in value):
        return tuple(float(c) for c in value)
    return tuple(tuple(float(c) for c in t) for t in value)


class Muon(Optimizer):
    """Muon for 2-D hidden weights and AdamW for everything else, in one optimizer.

    Which side a parameter takes is decided once, when its group is added, and saved in the group
    (``muon_mask``), so a checkpoint resumes with the same split:

    1. a group key ``use_muon`` (``True``/``False``) decides for the whole group (``True`` on a
       parameter with fewer than 2 dims is an error);
    2. otherwise a parameter goes to Muon if it is 2-D (or, with ``flatten_conv=True``, has more
       than 2 dims) and its name (from the group's ``param_names``) matches none of
       ``adamw_patterns``. Without names only the shape decides, so pass named parameters
       (``build_optimizer`` does) or embeddings and the output head would get Muon.

    Conv weights (4-D) go to AdamW by default, as the issue asks; ``flatten_conv=True`` views them
    as ``(out_channels, -1)`` matrices as Keller's implementation does.

    How the two learning rates relate: the AdamW side uses ``group lr * adamw_lr_ratio``, so
    schedules and layer decay (which change the group lr) scale both sides together. With
    ``adjust_lr_fn="original"`` (Keller; Muon lr ~0.02) the ratio defaults to ``3e-4 / 0.02 =
    0.015`` (Keller's aux-Adam lr); with ``"match_rms_adamw"`` (Moonlight: the Muon update has an
    AdamW-like RMS of 0.2) it defaults to 1, i.e. one lr (and one weight decay) for both sides.

    Args:
        params: parameters, ``(name, tensor)`` pairs or param-group dicts (``param_names``,
            ``lr_scale``, ``use_muon`` and other extra keys are kept).
        lr: Muon learning rate (default ``0.02``, Keller's).
        weight_decay: decoupled weight decay for both sides, ``p *= 1 - lr_side * wd`` (default 0).
        momentum: Muon momentum ``mu`` in [0, 1) (default ``0.95``).
        nesterov: use the Nesterov form ``lerp(g, B, mu)`` (default ``True``).
        ns_steps: Newton-Schulz iterations (default 5).
        ns_coefficients: quintic coefficients: one ``(a, b, c)`` for every step (default Keller's
            ``(3.4445, -4.7750, 2.0315)``), one triple per step (``ns_steps`` of them), or
            ``"polar_express"`` (Amsel et al. 2025's per-step minimax schedule, arXiv:2505.16932:
            closer to orthogonal at the same cost per step, see :func:`newton_schulz_error`).
        eps: lower bound of the Frobenius norm in Newton-Schulz (default ``1e-7``).
        ns_dtype: dtype of the Newton-Schulz iteration: ``None`` (default) picks by hardware
            (:func:`default_ns_dtype`): bfloat16 on CUDA and on CPUs with fast bf16 matmuls
            (AVX512-BF16/AMX), float32 elsewhere (bf16 matmuls are ~100x slower than float32 on an
            AVX2 CPU; float64 for float64 parameters off CUDA). A dtype or
            ``"float32"``/``"bfloat16"``/``"float64"``.
        adjust_lr_fn: ``"original"`` (default) or ``"match_rms_adamw"``, named as in
            ``torch.optim.Muon`` (``None`` means ``"original"``).
        adamw_lr: absolute AdamW-side lr; stored as the ratio ``adamw_lr / lr`` (default ``None``).
        adamw_lr_ratio: AdamW-side lr as a multiple of the group lr (default ``None``: see above).
        adamw_betas: AdamW betas (default ``(0.9, 0.95)``, Keller's and Moonlight's).
        adamw_eps: AdamW eps (default ``1e-10``, Keller's).
        adamw_patterns: name regexes of 2-D parameters sent to AdamW (default
            :data:`DEFAULT_ADAMW_PATTERNS`: embeddings and the output head).
        flatten_conv: give parameters with more than 2 dims to Muon as ``(dim0, -1)`` matrices
            instead of AdamW (default ``False``).
        impl: ``"auto"`` (default), ``"for_loop"`` or ``"foreach"``. The Muon side runs one matrix
            at a time with ``"for_loop"`` (the reference), and with ``"foreach"`` orthogonalizes all
            matrices of one shape in one batched Newton-Schulz chain (``"auto"``: batched on CUDA,
            one at a time on the CPU, where batching measured no faster). The AdamW
            side runs :func:`~lightning_opt.optim._hybrid.adamw_side` with the same impl
            (``"auto"``: the fused C kernel on the CPU, Triton on CUDA).
        distributed: ``"auto"`` (default) or ``"local"``. With ``"auto"``, on FSDP2 shards
            (``fully_shard``) and under DDP (a process group of more than one rank) each matrix's
            Newton-Schulz runs on one owning rank (:func:`muon_owner_compute_`: FSDP2 sends its
            rows there and the result's rows back with two packed ``all_to_all_single`` per step,
            DDP owners broadcast their results), one matrix at a time whatever ``impl`` says (it
            still picks the AdamW side's kernel); the momentum stays with the rows, so the state is
            sharded like the parameters. ``"local"``: every process steps its own tensors alone
            (refused for shards). A group may set its own.

    Raises:
        ValueError: invalid lr, weight decay, momentum, betas, eps, ns_steps, coefficients,
            ns_dtype, adjust_lr_fn, impl, distributed or pattern; both ``adamw_lr`` and ``adamw_lr_ratio``;
            ``use_muon=True`` on a parameter with fewer than 2 dims (or more than 2 without
            ``flatten_conv``); a flag (``nesterov``, ``flatten_conv``, a group's ``use_muon``) that is
            not a bool; a DTensor on the Muon side with ``distributed="local"``.
        NotImplementedError: a DTensor on the Muon side that is not FSDP2's ``Shard(0)`` on a 1-D mesh.

    Example:
        >>> opt = Muon(model.named_parameters(), lr=0.02, weight_decay=0.01)
        >>> opt = build_optimizer(model, "muon", lr=1e-3, adjust_lr_fn="match_rms_adamw", weight_decay=0.1)

    The Muon side matches ``torch.optim.Muon`` (EMA momentum, the same ``adjust_lr_fn`` rules);
    the difference is that torch always runs Newton-Schulz in bfloat16, here ``ns_dtype`` chooses.
    The AdamW side matches ``torch.optim.AdamW``. Papers: Keller Jordan, "Muon: An optimizer for
    hidden layers in neural networks" (2024); Liu et al., "Muon is Scalable for LLM Training",
    arXiv:2502.16982.
    """

    #: the ``impl`` values this class takes besides ``"auto"`` (the contract suite runs each)
    impls: ClassVar[tuple[str, ...]] = tuple(MUON_IMPLS)
    #: orthogonalized updates have no complex form here (base.reject_complex)
    supports_complex: ClassVar[bool] = False
    #: group options with their own checks (base.check_options: the constructor's and each group's)
    option_checks: ClassVar[dict[str, OptionCheck]] = {
        "ns_dtype": lambda cls, key, value: _resolve_dtype(value),
        "ns_steps": lambda cls, key, value: _checked(
            cls, key, value, is_int(value) and 0 < value < 100, "it must be an int in [1, 99]"
        ),
        "eps": lambda cls, key, value: _checked(cls, key, value, is_number(value) and value > 0, "it must be > 0"),
        "adjust_lr_fn": lambda cls, key, value: _checked(
            cls, key, value, value in get_args(AdjustLR), f"expected one of {get_args(AdjustLR)}"
        ),
        "adamw_lr_ratio": lambda cls, key, value: _checked(
            cls, key, value, is_number(value) and value >= 0, "it must be a finite number >= 0"
        ),
        "adamw_eps": lambda cls, key, value: _checked(
            cls, key, value, is_number(value) and value >= 0, "it must be a finite number >= 0"
        ),
        "adamw_betas": lambda cls, key, value: check_betas(cls, value, key=key),
        "adamw_patterns": compile_patterns,
        "distributed": lambda cls, key, value: check_distributed(cls, value),
    }

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        *,
        ns_steps: int = 5,
        ns_coefficients: NSCoefficients = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_dtype: torch.dtype | str | None = None,
        adjust_lr_fn: AdjustLR | None = "original",
        adamw_lr: float | None = None,
        adamw_lr_ratio: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-10,
        adamw_patterns: Sequence[str] = DEFAULT_ADAMW_PATTERNS,
        flatten_conv: bool = False,
        impl: Impl = "auto",
        distributed: Distributed = "auto",
    ) -> None:
        check_arg("Muon", "lr", lr, is_number(lr) and lr >= 0, "lr must be a finite number >= 0")
        check_arg(
            "Muon",
            "weight_decay",
            weight_decay,
            is_number(weight_decay) and weight_decay >= 0,
            "it must be a finite number >= 0",
        )
        check_arg("Muon", "momentum", momentum, is_number(momentum) and 0 <= momentum < 1, "it must lie in [0, 1)")
        check_arg(
            "Muon",
            "ns_steps",
            ns_steps,
            isinstance(ns_steps, int) and not isinstance(ns_steps, bool) and 0 < ns_steps < 100,
            "it must be an int in [1, 99]",
        )
        ns_coefficients = _store_coefficients(ns_coefficients, ns_steps)
        check_arg("Muon", "eps", eps, is_number(eps) and eps > 0, "it must be a finite number > 0")
        ns_dtype = _resolve_dtype(ns_dtype)
        adjust_lr_fn = "original" if adjust_lr_fn is None else adjust_lr_fn
        check_arg(
            "Muon",
            "adjust_lr_fn",
            adjust_lr_fn,
            adjust_lr_fn in get_args(AdjustLR),
            f"expected one of {get_args(AdjustLR)}",
        )
        if adamw_lr is not None and adamw_lr_ratio is not None:
            raise ValueError(
                "Muon(adamw_lr=..., adamw_lr_ratio=...) are exclusive; give one (adamw_lr is stored as adamw_lr / lr)"
            )
        if adamw_lr is not None:
            check_arg(
                "Muon", "adamw_lr", adamw_lr, is_number(adamw_lr) and adamw_lr >= 0, "it must be a finite number >= 0"
            )
            check_arg(
                "Muon",
                "lr",
                lr,
                lr > 0,
                "adamw_lr is stored as adamw_lr / lr, so lr must be > 0 (or pass adamw_lr_ratio)",
            )
            adamw_lr_ratio = adamw_lr / lr
        elif adamw_lr_ratio is None:
            adamw_lr_ratio = _ORIGINAL_ADAMW_RATIO if adjust_lr_fn == "original" else 1.0
        check_arg(
            "Muon",
            "adamw_lr_ratio",
            adamw_lr_ratio,
            is_number(adamw_lr_ratio) and adamw_lr_ratio >= 0,
            "it must be a finite number >= 0",
        )
        check_arg(
            "Muon",
            "adamw_betas",
            adamw_betas,
            isinstance(adamw_betas, (tuple, list))
            and len(adamw_betas) == 2
            and all(is_number(b) and 0 <= b < 1 for b in adamw_betas),
            "expected two floats in [0, 1)",
        )
        check_arg(
            "Muon", "adamw_eps", adamw_eps, is_number(adamw_eps) and adamw_eps >= 0, "it must be a finite number >= 0"
        )
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": check_flag("Muon", "nesterov", nesterov),
            "ns_steps": ns_steps,
            "ns_coefficients": ns_coefficients,
            "eps": eps,
            "ns_dtype": ns_dtype,
            "adjust_lr_fn": adjust_lr_fn,
            "adamw_lr_ratio": float(adamw_lr_ratio),
            "adamw_betas": tuple(float(b) for b in adamw_betas),
            "adamw_eps": adamw_eps,
            "adamw_patterns": compile_patterns("Muon", "adamw_patterns", adamw_patterns),
            "flatten_conv": check_flag("Muon", "flatten_conv", flatten_conv),
            "impl": impl,
            "distributed": distributed,
        }
        # the same checks every param group's own options get (base.check_options)
        defaults = check_options("Muon", defaults, impls=MUON_IMPLS, checks=self.option_checks)
        super().__init__(params, defaults)
        guard_param_layout(self, type(self).__name__, "orthogonalizes each whole matrix")
        if not any(any(g["muon_mask"]) for g in self.param_groups):
            warnings.warn(
                "Muon: no parameter is a 2-D hidden matrix (all are 1-D, conv or named like embeddings/the "
                "output head), so every parameter runs the AdamW side at adamw_lr_ratio x lr; use adamw, "
                "pass flatten_conv=True for conv weights, or set use_muon=True on a group",
                UserWarning,
                stacklevel=2,
            )
        keep_state_dtype_on_load(self)
        self.register_load_state_dict_post_hook(Muon._backfill_masks)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        backfill_group_defaults(self, impl="auto", distributed="auto")

    def _muon_mask(self, group: dict[str, Any]) -> list[bool]:
        return route_matrices(
            group["params"],
            group.get("param_names"),
            cls="Muon",
            override_key="use_muon",
            override=group.get("use_muon"),
            exclude=group["adamw_patterns"],
            flatten_conv=group["flatten_conv"],
            distributed=group.get("distributed", "auto"),
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its Muon/AdamW split is decided here and stored as ``group["muon_mask"]``."""
        # checked before adding (base.check_param_group): a refused group must not stay in param_groups
        param_group = check_param_group(self, param_group)
        if "ns_coefficients" in param_group or "ns_steps" in param_group:
            param_group["ns_coefficients"] = _store_coefficients(
                param_group.get("ns_coefficients", self.defaults.get("ns_coefficients")),
                param_group.get("ns_steps", self.defaults.get("ns_steps")),
            )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["muon_mask"] = self._muon_mask(group)

    @staticmethod
    def _backfill_masks(opt: Optimizer) -> None:
        # a checkpoint saved without the split (none so far) gets it recomputed from the groups
        for group in opt.param_groups:
            group.setdefault("impl", "auto")
            if "muon_mask" not in group:
                group["muon_mask"] = opt._muon_mask(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; ``closure`` (re-evaluating the loss) is called once, with grad enabled."""
        loss = run_closure(closure)
        shared = []  # the groups whose Muon side runs owner-compute (FSDP2 shards, DDP replicas)
        for group in self.param_groups:
            mp, mg, mb = [], [], []
            ap, ag, am, av, steps = [], [], [], [], []
            for p, on_muon in zip(group["params"], group["muon_mask"]):
                if p.grad is None:
                    continue
                reject_sparse_grad(p, "Muon")
                state = self.state[p]
                if on_muon:
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(
                            p, dtype=compute_dtype(p), memory_format=torch.contiguous_format
                        )
                    mp.append(p)
                    mg.append(p.grad)
                    mb.append(state["momentum_buffer"])
                else:
                    adamw_state_(state, p)
                    state["step"] += 1
                    ap.append(p)
                    ag.append(p.grad)
                    am.append(state["exp_avg"])
                    av.append(state["exp_avg_sq"])
                    steps.append(state["step"])
            if mp and topology(mp, group["distributed"]).mode != "single":
                shared.append((group, mp, mg, mb))
                mp, mg, mb = [], [], []
            muon(
                mp,
                mg,
                mb,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                nesterov=group["nesterov"],
                ns_steps=group["ns_steps"],
                ns_coefficients=group["ns_coefficients"],
                eps=group["eps"],
                ns_dtype=group["ns_dtype"],
                adjust_lr_fn=group["adjust_lr_fn"],
                impl=group["impl"],
            )
            beta1, beta2 = group["adamw_betas"]
            adamw_side(
                ap,
                ag,
                am,
                av,
                steps,
                lr=group["lr"] * group["adamw_lr_ratio"],
                beta1=beta1,
                beta2=beta2,
                eps=group["adamw_eps"],
                weight_decay=group["weight_decay"],
                impl=group["impl"],
                cls="Muon",
            )
        if shared:
            muon_owner_compute_(shared)
        return loss


register(
    OptimInfo(
        name="muon",
        cls=Muon,
        description="Muon (Newton-Schulz-orthogonalized momentum) on 2-D hidden weights, AdamW on the rest",
        paper="Keller Jordan 2024 (kellerjordan.github.io/posts/muon); Liu et al., arXiv:2502.16982",
        default_lr=0.02,
    )
)
register_alias("MuonOptimizer", "muon", source="deepspeed")
