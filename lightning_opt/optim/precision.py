"""The shared precision service: compute dtype, state-dtype policy, rounding of the final store.

Infrastructure (registers nothing). Every family and every implementation (``for_loop``,
``foreach``, the fused CPU kernel, Triton) follows the same rules, so a precision plugin can switch a
rounding mode on for any optimizer:

- **Compute dtype**: the math runs in float32 for bfloat16/float16 tensors, in the tensor's own
  dtype otherwise (:func:`compute_dtype`).
- **State dtype** (one policy): elementwise state (moments, EMAs, momentum buffers) is created like
  the parameter, in the parameter's dtype, as torch.optim does, so ``bf16-true`` halves state
  memory; matrix-optimizer state that feeds a whole-matrix computation (Muon's momentum, SOAP's
  preconditioners, the AdamW side of the hybrids) is float32 for bf16/fp16 parameters
  (:func:`matrix_state_dtype`). :func:`keep_state_dtype_on_load` keeps that float32 state float32
  through ``load_state_dict`` (torch would cast it to the parameter's dtype).
- **The final store** of a bf16/fp16 parameter is one of three roundings (:data:`Rounding`):
  ``"nearest"`` (round to nearest even, what ``param.add_(delta_fp32)`` does), ``"kahan"``
  (Kahan-compensated: the part of each update that rounding lost is kept in a buffer of the
  parameter's dtype and added back next step; Zamirai et al. 2020, arXiv:2010.06192, the scheme of
  torch-optimi's ``kahan_sum``) or ``"stochastic"`` (round up with probability equal to the
  remainder, so updates below the resolution survive in expectation; bfloat16 only, no extra
  memory). float32/float64 parameters always take the plain store.

Stochastic rounding draws its bits from a counter-based hash of the element index, a seed and the
bits of the unrounded value (:func:`sr_bits`), not from a generator, so every implementation (torch
ops, C, Triton) draws the same bits. The seed is the tensor's step count (the value after the
step's increment; schedule-free: the group's step; Lion and LARS keep a ``step`` for it in their
state with ``stochastic_rounding``): a weight that did not move and takes the same update again
draws fresh bits, so its roundings are independent across steps and their mean is the update (with
one fixed seed the same value would round the same way at every step, and a sub-resolution update
would never, or always, move the weight). The seed is in the checkpointed state, so a checkpoint
round-trips bit-exactly.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "LOW_PRECISION",
    "Rounding",
    "all_reduce_coalesced",
    "apply_update_",
    "apply_updates_",
    "compute_dtype",
    "count_sr_step",
    "exact_sqrt",
    "exact_sqrt_",
    "is_dtensor",
    "kahan_add_",
    "keep_state_dtype_on_load",
    "local",
    "matrix_state_dtype",
    "new_kahan_comp",
    "run_reduction_rounds",
    "shard_groups",
    "shard_local",
    "shard_split",
    "sharded",
    "sr_bits",
    "sr_key",
    "sr_keys",
    "stochastic_round",
    "store_",
    "sum_squares",
    "tensor_abs_mean",
    "tensor_abs_means",
    "tensor_norm",
    "tensor_norms",
    "total_norm",
]

LOW_PRECISION = (torch.bfloat16, torch.float16)

#: How a bf16/fp16 parameter's update is stored (see the module docstring).
Rounding = Literal["nearest", "kahan", "stochastic"]

_MASK32 = 0xFFFFFFFF


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype optimizer math runs in for ``t``: float32 for bf16/fp16 tensors, else ``t.dtype``."""
    return torch.float32 if t.dtype in LOW_PRECISION else t.dtype


def matrix_state_dtype(t: Tensor) -> torch.dtype:
    """The dtype of whole-matrix state for ``t`` (float32 for bf16/fp16, else ``t.dtype``)."""
    return compute_dtype(t)


def exact_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)``, correctly rounded (a new tensor), the root every implementation takes.

    torch's CPU float32 ``sqrt`` goes through MKL's vector math, which is not correctly rounded
    (measured up to 0.75 ulp, on a fifth of the elements); the fused kernels' ``sqrtf`` and CUDA's
    are. The float64 root rounded to float32 is the correctly rounded one (a float32 input's root lies
    at least 2^-50 relative from a float32 rounding midpoint, far more than the float64 root's
    error). Stochastic rounding (whose bits hash the unrounded value) and trust ratios (which couple
    every element of a tensor) need the impls to agree beyond rounding.
    """
    if x.dtype == torch.float32 and x.device.type == "cpu":
        return x.double().sqrt_().to(torch.float32)
    return x.sqrt()


def exact_sqrt_(x: Tensor) -> Tensor:
    """:func:`exact_sqrt` in place."""
    if x.dtype == torch.float32 and x.device.type == "cpu":
        return x.copy_(x.double().sqrt_())
    return x.sqrt_()


# Per-tensor reductions on FSDP2 shards. The engine runs a bucket of DTensor shards on their local
# tensors inside :func:`shard_local`; the reductions below then add the local partial sums of every
# tensor in one all-reduce per call (one collective for a whole list, never one per parameter), so
# a family's norms and means are those of the whole parameter while its elementwise math stays local.
_SHARD_GROUPS: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar("lightning_opt_shard_groups", default=())


@contextlib.contextmanager
def shard_local(groups: Sequence[Any]) -> Iterator[None]:
    """Within this block the tensors are local shards: reductions all-reduce over ``groups``.

    ``groups`` are the process groups of the mesh dimensions the tensors are sharded on (empty:
    replicated or plain tensors, nothing to reduce).
    """
    token = _SHARD_GROUPS.set(tuple(groups))
    try:
        yield
    finally:
        _SHARD_GROUPS.reset(token)


def is_dtensor(t: Any) -> bool:
    """``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 shard). No DTensor exists before
    ``torch.distributed.tensor`` is imported, so this never imports it (that costs seconds)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: Any) -> Any:
    """The local shard of a DTensor (a view: in-place ops update the parameter), else ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def _shard_dims(cls: str, t: Tensor) -> list[tuple[int, Any]]:
    """``(tensor dim, process group)`` of every mesh dim the DTensor ``t`` is sharded on, in mesh order:
    the one placement check of the sharded paths (``cls`` names the optimizer in the error).

    Raises:
        NotImplementedError: a placement that is neither ``Shard`` nor ``Replicate`` (``Partial``:
            an unreduced sum). A ``RuntimeError`` subclass.
    """
    dims = []
    for mesh_dim, placement in enumerate(t.placements):
        if placement.is_shard():
            dims.append((placement.dim % t.ndim, t.device_mesh.get_group(mesh_dim)))
        elif not placement.is_replicate():
            raise NotImplementedError(
                f"{cls} steps sharded or replicated DTensors, got placements {tuple(t.placements)} "
                f"({placement!r} is a partial sum, not reduced yet); reduce the gradients before the step"
            )
    return dims


def shard_groups(cls: str, t: Tensor) -> tuple[Any, ...]:
    """The process groups of the mesh dimensions ``t`` (a DTensor) is sharded on (``cls`` names the
    optimizer in the error for a partial-sum placement: ``NotImplementedError``, see :func:`shard_split`)."""
    return tuple(group for _, group in _shard_dims(cls, t))


def shard_split(cls: str, t: Any) -> tuple[int, Any] | None:
    """``(dim, group)`` of a DTensor split along one mesh dim: the tensor dim split across the ranks
    and that mesh dim's process group; ``None`` for a plain tensor or a replicated DTensor.

    For math that treats the split dim apart from the others (Adafactor's and AdaLomo's factored
    statistics: the rows of a ``Shard(0)`` matrix are whole on each rank, its column sums partial).

    Raises:
        NotImplementedError: a ``Partial`` placement (as :func:`shard_groups`), or ``t`` split along
            more than one mesh dim (HSDP, FSDP2 with tensor parallelism).
    """
    if not is_dtensor(t):
        return None
    dims = _shard_dims(cls, t)
    if len(dims) > 1:
        raise NotImplementedError(
            f"{cls} steps DTensors split along one mesh dim (FSDP2's Shard(0)), got placements {tuple(t.placements)}"
        )
    return dims[0] if dims else None


def sum_squares(xs: Sequence[Tensor]) -> Tensor:
    """``sum(x^2)`` over every element of the plain tensors ``xs``, accumulated in float64: a 0-d
    float64 tensor on ``xs[0]``'s device.

    CPU tensors of one dtype go through one call of the fused CPU kernel (``kernels/csrc/norms.c``:
    multi-threaded, deterministic) when it builds on this machine; anything else through torch's
    float64 norms. Both sum in float64, so they agree to far below float32's resolution.
    """
    if not xs:
        return torch.zeros((), dtype=torch.float64)
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for x in xs:
        by_kind.setdefault((x.device, x.dtype), []).append(x)
    total = None
    for (device, dtype), group in by_kind.items():
        part = None
        if device.type == "cpu":
            from lightning_opt.kernels import cpu

            if dtype in cpu.DTYPES and cpu.available("norms"):
                sums = cpu.launch("norms", "sumsq", [group], [], n_out=1)
                part = torch.tensor(sum(s[0] for s in sums), dtype=torch.float64)
        if part is None:
            part = torch.stack(torch._foreach_norm(group, 2, dtype=torch.float64)).square().sum()
        part = part.to(xs[0].device)
        total = part if total is None else total + part
    return total


def total_norm(cls: str, xs: Sequence[Tensor]) -> Tensor:
    """``||concat(xs)||`` (a global gradient norm) as a plain 0-d tensor: squares summed in float64
    (:func:`sum_squares`), the root rounded once to ``xs[0]``'s compute dtype; DTensor shards add
    their local sums in one all-reduce per mesh."""
    if not any(is_dtensor(x) for x in xs):
        return sum_squares(xs).sqrt().to(compute_dtype(xs[0]))
    by_groups: dict[tuple[Any, ...], list[Tensor]] = {}
    for x in xs:
        by_groups.setdefault(shard_groups(cls, x) if is_dtensor(x) else (), []).append(local(x))
    total = None
    for groups, mine in by_groups.items():
        part = sum_squares(mine).reshape(1)
        with shard_local(groups):
            _sum_shards_(part)
        total = part if total is None else total + part.to(total.device)
    return total[0].sqrt().to(compute_dtype(xs[0]))


def sharded() -> bool:
    """Whether reductions currently sum over shards (inside :func:`shard_local` with a group)."""
    return bool(_SHARD_GROUPS.get())


def _sum_shards_(t: Tensor) -> Tensor:
    for group in _SHARD_GROUPS.get():
        dist.all_reduce(t, group=group)
    return t


def all_reduce_coalesced(parts: Sequence[tuple[Any, Tensor]]) -> None:
    """Sum the tensor of each ``(process group, tensor)`` over its group, in place: one ``all_reduce``
    per (group, dtype, device), the bucket's tensors flattened into one buffer (never one per tensor).

    Every rank passes the same groups, dtypes and shapes in the same order (the collectives run in
    the order the buckets first appear).
    """
    buckets: dict[tuple[Any, torch.dtype, torch.device], list[Tensor]] = {}
    for group, t in parts:
        buckets.setdefault((group, t.dtype, t.device), []).append(t)
    for (group, _, _), ts in buckets.items():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, group=group)
        offset = 0
        for t in ts:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


#: What a generator run by :func:`run_reduction_rounds` yields each round: ``(process group, partial sum)`` pairs
Partials = Sequence[tuple[Any, Tensor]]


def run_reduction_rounds(steps: Iterable[Iterator[Partials]]) -> None:
    """Run the generators ``steps`` to the end in lockstep rounds, summing their partials between rounds.

    Each generator yields, once per round, the ``(process group, partial sum)`` pairs its math needs
    summed over the ranks of the group, and resumes once they hold the totals (a math whose second
    reduction needs the first's result, such as Adafactor's ``RMS(U)`` after the column statistics,
    yields twice). The pairs of one round, from every generator still running, go through one
    :func:`all_reduce_coalesced`: one collective per round (and group, dtype, device), not one per
    tensor or per generator; a round without pairs issues none. Every rank runs the same
    generators, so the rounds and their collectives match.

    Example (the global mean of a sharded tensor's local shard ``x``):
        >>> def mean(x, group, out):
        ...     both = torch.stack([x.sum(), torch.tensor(float(x.numel()))])
        ...     yield [(group, both)]
        ...     out.append(both[0] / both[1])
        >>> run_reduction_rounds([mean(x, group, out)])
    """
    live = list(steps)
    while live:
        parts: list[tuple[Any, Tensor]] = []
        still = []
        for gen in live:
            try:
                parts.extend(next(gen))
            except StopIteration:
                continue
            still.append(gen)
        if parts:
            all_reduce_coalesced(parts)
        live = still


def tensor_norm(x: Tensor) -> Tensor:
    """``||x||`` accumulated in float64 and rounded once to ``x``'s dtype.

    Every impl takes its per-tensor norms this way (the fused kernels sum per-chunk partials in
    double), so they agree on a trust ratio to the last bit. On shards (:func:`shard_local`) the
    squared local norms are summed over the shards first.
    """
    if not sharded():
        return torch.linalg.vector_norm(x, dtype=torch.float64).to(x.dtype)
    sq = torch.linalg.vector_norm(x, dtype=torch.float64).square().reshape(1)
    return _sum_shards_(sq).sqrt_()[0].to(x.dtype)


def tensor_norms(xs: Sequence[Tensor]) -> Tensor:
    """:func:`tensor_norm` of each of ``xs`` (one dtype), stacked (one multi-tensor call; on shards
    one all-reduce for the whole list)."""
    norms = torch.stack(torch._foreach_norm(list(xs), 2, dtype=torch.float64))
    if sharded():
        norms = _sum_shards_(norms.square_()).sqrt_()
    return norms.to(xs[0].dtype)


def tensor_abs_mean(x: Tensor) -> Tensor:
    """``mean(|x|)`` in ``x``'s dtype; on shards the sums and element counts of all shards."""
    if not sharded():
        return x.abs().mean()
    both = torch.stack([x.abs().sum(dtype=torch.float64), torch.tensor(float(x.numel()), dtype=torch.float64)])
    _sum_shards_(both)
    return (both[0] / both[1]).to(x.dtype)


def tensor_abs_means(xs: Sequence[Tensor]) -> Tensor:
    """:func:`tensor_abs_mean` of each of ``xs`` (one dtype), stacked; on shards one all-reduce."""
    sums = torch.stack(torch._foreach_norm(list(xs), 1))
    numels = torch.tensor([float(x.numel()) for x in xs], dtype=sums.dtype, device=sums.device)
    if not sharded():
        return sums.div_(numels)
    both = _sum_shards_(torch.cat([sums.double(), numels.double()]))
    return (both[: len(xs)] / both[len(xs) :]).to(sums.dtype)


def new_kahan_comp(param: Tensor) -> Tensor | None:
    """A zero compensation buffer for ``param`` if it is bf16/fp16, else ``None`` (fp32 needs none)."""
    if param.dtype in LOW_PRECISION:
        return torch.zeros_like(param, memory_format=torch.preserve_format)
    return None


def kahan_add_(param: Tensor, delta: Tensor, comp: Tensor) -> None:
    """``param += delta`` with Kahan compensation; ``comp`` carries the rounding error across calls.

    Args:
        param: the (low-precision) parameter, updated in place.
        delta: the update to add, in any floating dtype (usually float32); not modified.
        comp: compensation buffer of ``param``'s shape and dtype, updated in place.

    The sequence is ``c += delta; old = p; p += c; c += old - p`` (each result rounded to the
    parameter's dtype): after it, ``p + c`` equals the exactly accumulated sum up to the rounding of
    ``c`` itself, so updates below ``p``'s resolution accumulate in ``c`` until they move ``p``.
    """
    comp.add_(delta)
    old = param.detach().clone()
    param.add_(comp)
    comp.add_(old.sub_(param))


def _hash32(x: Tensor) -> Tensor:
    # Wellons' "lowbias32" integer hash on int64 tensors holding 32-bit values (products wrap; the
    # mask keeps the low 32 bits, as uint32 arithmetic in C and Triton does)
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def sr_key(seed: int) -> int:
    """The 32-bit key of ``seed`` that :func:`sr_bits` adds to the element index:
    ``seed * 0x9E3779B9 mod 2**32`` (the golden-ratio multiplier spreads consecutive steps apart).
    The fused C and Triton kernels take per-tensor keys computed here."""
    return (int(seed) * 0x9E3779B9) & _MASK32


def sr_keys(stochastic: bool, seeds: Sequence[int] | None, n: int) -> list[int]:
    """The per-tensor keys a fused kernel takes after its other integer arguments: :func:`sr_key`
    of each of ``seeds`` (``n`` of them; ``None``: seed 0) with ``stochastic``, none without."""
    if not stochastic:
        return []
    if seeds is None:
        return [0] * n
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} stochastic-rounding seeds for {n} tensors")
    return [sr_key(s) for s in seeds]


def sr_bits(value: Tensor, *, seed: int = 0) -> Tensor:
    """The 16 random bits stochastic rounding adds to each float32 element of ``value`` (int64).

    ``hash32(hash32((index + sr_key(seed)) mod 2**32) ^ bits(value)) & 0xFFFF``, with ``index`` the
    element's position in the flattened tensor: the same in every implementation. The optimizers
    pass the tensor's step count as ``seed`` (see the module docstring): a value rounded twice with
    one seed (a weight that did not move, taking the same update again: Lion's +-lr, Adam on a
    steady gradient) would draw the same bits both times, biasing the rounding over steps.
    """
    flat = value.reshape(-1)
    idx = torch.arange(flat.numel(), device=value.device, dtype=torch.int64)
    idx = (idx + sr_key(seed)) & _MASK32
    bits = flat.view(torch.int32).to(torch.int64) & _MASK32
    return (_hash32(_hash32(idx) ^ bits) & 0xFFFF).view(value.shape)


def stochastic_round(value: Tensor, *, seed: int = 0) -> Tensor:
    """``value`` (float32) rounded to bfloat16, up with probability equal to the dropped remainder
    (over seeds: pass a fresh ``seed``, e.g. the step count, for each rounding of a tensor).

    The 16 dropped mantissa bits plus :func:`sr_bits` (of ``seed``) carry into the kept bits or not;
    inf and NaN are rounded to nearest (the carry would change them).
    """
    if value.dtype != torch.float32:
        raise TypeError(f"stochastic_round takes float32 values, got {value.dtype}")
    bits = value.reshape(-1).view(torch.int32).to(torch.int64) & _MASK32
    rounded = ((bits + sr_bits(value, seed=seed).reshape(-1)) & 0xFFFF0000).to(torch.int64)
    # back to a signed int32 bit pattern
    rounded = torch.where(rounded >= 2**31, rounded - 2**32, rounded).to(torch.int32)
    out = rounded.view(torch.float32).view(value.shape).to(torch.bfloat16)
    return torch.where(torch.isfinite(value), out, value.to(torch.bfloat16))


def store_(param: Tensor, value: Tensor, *, stochastic: bool = False, seed: int = 0) -> None:
    """Write ``value`` (the updated parameter in its compute dtype) into ``param``.

    ``stochastic`` rounds a bfloat16 parameter stochastically with bits of ``seed`` (the tensor's
    step count, :func:`sr_bits`); otherwise the copy rounds to nearest.
    """
    if stochastic and param.dtype == torch.bfloat16:
        param.copy_(stochastic_round(value.float(), seed=seed))
    else:
        param.copy_(value)


def apply_update_(
    param: Tensor, delta: Tensor, comp: Tensor | None, *, stochastic: bool = False, seed: int = 0
) -> None:
    """``param += delta``: Kahan-compensated with a ``comp`` buffer, stochastically rounded with
    ``stochastic`` (bfloat16; bits of ``seed``, the tensor's step count), rounded to nearest otherwise."""
    if comp is not None:
        kahan_add_(param, delta, comp)
    elif stochastic and param.dtype == torch.bfloat16:
        param.copy_(stochastic_round(param.float().add_(delta), seed=seed))
    else:
        param.add_(delta)  # computed in the wider dtype, rounded once to param's


def apply_updates_(
    params: Sequence[Tensor],
    deltas: Sequence[Tensor],
    comps: Sequence[Tensor | None],
    *,
    stochastic: bool = False,
    seeds: Sequence[int] | None = None,
) -> None:
    """:func:`apply_update_` over lists with multi-tensor (``torch._foreach_*``) ops.

    All ``params`` share one dtype (the engine buckets by device and dtype); ``comps`` is all
    buffers or all ``None``; ``seeds`` the stochastic-rounding seed of each parameter (``None``: 0).
    """
    if not params:
        return
    params, deltas = list(params), list(deltas)
    if comps and comps[0] is not None:
        comps = list(comps)
        torch._foreach_add_(comps, deltas)
        old = torch._foreach_mul(params, 1.0)  # a copy
        torch._foreach_add_(params, comps)
        torch._foreach_sub_(old, params)
        torch._foreach_add_(comps, old)
    elif stochastic and params[0].dtype == torch.bfloat16:
        for p, d, s in zip(params, deltas, [0] * len(params) if seeds is None else seeds):
            p.copy_(stochastic_round(p.float().add_(d), seed=s))
    elif params[0].dtype == deltas[0].dtype:
        torch._foreach_add_(params, deltas)
    else:
        # foreach add needs equal dtypes: add in float32, round once on the copy back
        wide = [p.to(d.dtype) for p, d in zip(params, deltas)]
        torch._foreach_add_(wide, deltas)
        torch._foreach_copy_(params, wide)


def count_sr_step(state: dict[str, Any], param: Tensor, stochastic: bool) -> int:
    """The stochastic-rounding seed of ``param`` in a family that keeps no step count (Lion, LARS).

    With ``stochastic`` and a bfloat16 ``param``: its state's int ``step``, incremented (created at
    0; a checkpoint from before it resumes at 0), the count :func:`sr_bits` seeds with. Otherwise 0,
    and no state is kept.
    """
    if not stochastic or param.dtype != torch.bfloat16:
        return 0
    state["step"] = int(state.get("step", 0)) + 1
    return state["step"]


def keep_state_dtype_on_load(optimizer: Optimizer) -> None:
    """Keep the state of low-precision parameters in its saved dtypes through ``load_state_dict``.

    torch's ``Optimizer.load_state_dict`` casts every floating state tensor to its parameter's
    dtype, which would round float32 moments of bf16 parameters to bf16 (and break exact resume). A
    pre-hook keeps the saved entries of bf16/fp16 parameters (nested lists and dicts included) and a
    post-hook puts them back, moved to the parameter's device, in their saved dtypes.
    """
    kept: dict[int, Any] = {}

    def _move(value: Any, device: torch.device) -> Any:
        if isinstance(value, Tensor):
            return value.to(device=device, copy=True)
        if isinstance(value, dict):
            return {k: _move(v, device) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(_move(v, device) for v in value)
        return value

    def pre_hook(opt: Optimizer, state_dict: dict[str, Any]) -> None:
        kept.clear()
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in opt.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            if p.dtype in LOW_PRECISION and saved_id in state_dict["state"]:
                kept[id(p)] = _move(state_dict["state"][saved_id], p.device)

    def post_hook(opt: Optimizer) -> None:
        for g in opt.param_groups:
            for p in g["params"]:
                if id(p) in kept:
                    opt.state[p] = kept[id(p)]
        kept.clear()

    optimizer.register_load_state_dict_pre_hook(pre_hook)
    optimizer.register_load_state_dict_post_hook(post_hook)
