"""The one multi-tensor launcher of the Triton kernels, and whether Triton can run here.

Host side only: importing this module never imports triton (:func:`usable` does, lazily), so the
engine can ask it on any machine. The device functions every kernel shares (loads and stores with
rounding, stochastic rounding, Kahan) are in :mod:`lightning_opt.kernels.triton_common`.

A bucket of tensors (one device and dtype, from :func:`lightning_opt.optim.engine.dispatch`) is
described to a kernel by :class:`Tables`, device int64 tables built once and cached:

- ``ptrs[t * L + l]``: the data pointer of tensor ``t`` of list ``l`` (``L`` lists; 0 where an entry
  is ``None``, e.g. an absent Kahan buffer);
- ``sizes[t]``: the number of elements of tensor ``t``;
- ``blocks[2 b]``, ``blocks[2 b + 1]``: the tensor and the first element of program ``b``'s block;
  a tensor's blocks are consecutive, so ``first[t] .. first[t + 1]`` are its programs (the per-block
  partial sums of a reduction are summed in that order: deterministic, no atomics).

Elementwise kernels take one launch per bucket over all its tensors (:func:`elementwise`); kernels
with a per-tensor reduction take three (partials, per-tensor reduce, apply). Hyperparameters are
runtime float64 scalars (a learning-rate schedule never recompiles; they are rounded to the compute
dtype inside the kernel, as the C kernels and torch's scalar ops do); variants (weight decay,
Kahan, stochastic rounding, storage dtypes) are ``tl.constexpr`` switches; the stochastic rounding's
per-tensor seeds (step counts) are a runtime table (:func:`seed_table`).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Tables",
    "block_size",
    "by_value",
    "contiguous_lists",
    "elementwise",
    "interpreting",
    "kind",
    "launch",
    "launch_count",
    "reduce_then_apply",
    "require",
    "scalar_table",
    "seed_table",
    "tables",
    "usable",
]

#: storage kinds, the ``PK``/``SK`` constexprs of the kernels (triton_common has the same numbers)
KINDS = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}

_lock = threading.Lock()
_launches = 0
_driver_ok: bool | None = None
_driver_error = ""
_CACHE_SIZE = 64
_tables: OrderedDict[tuple[Any, ...], Tables] = OrderedDict()
_scalar_tables: OrderedDict[tuple[Any, ...], Tensor] = OrderedDict()


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: kernels run in Triton's interpreter (CPU tensors only)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _cuda_driver() -> bool:
    # ``import triton`` works on a CPU machine too; only the active driver says whether it can launch
    global _driver_ok, _driver_error
    if _driver_ok is None:
        try:
            from triton.runtime import driver

            driver.active.get_current_device()
            _driver_ok = True
        except Exception as err:  # noqa: BLE001 - any failure means no usable driver
            _driver_ok, _driver_error = False, f"{type(err).__name__}: {err}"
    return _driver_ok


def usable(device: torch.device | str) -> bool:
    """Triton kernels can step tensors on ``device`` here.

    True when triton is importable and either ``device`` is CUDA with a working Triton driver (and
    not in interpreter mode: the interpreter cannot follow pointer tables into GPU memory), or
    ``device`` is the CPU and ``TRITON_INTERPRET=1`` (the interpreter; for tests, far slower than
    the fused CPU kernels, so ``impl="auto"`` never asks for it).
    """
    device = torch.device(device)
    if not _triton_importable():
        return False
    if device.type == "cpu":
        return interpreting()
    if device.type == "cuda":
        return not interpreting() and torch.cuda.is_available() and _cuda_driver()
    return False


def require(device: torch.device | str) -> None:
    """Raise ``RuntimeError`` saying what is missing and which impl to use, unless :func:`usable`.

    Raises:
        RuntimeError: triton is not installed, there is no working CUDA driver, or the tensors are
            on the CPU without ``TRITON_INTERPRET=1`` (or on CUDA with it).
    """
    device = torch.device(device)
    if usable(device):
        return
    if not _triton_importable():
        why = "triton is not installed (pip install triton)"
    elif device.type == "cpu":
        why = "Triton has no CPU driver; set TRITON_INTERPRET=1 (before triton is imported) to run its interpreter"
    elif device.type != "cuda":
        why = f"Triton kernels run on CUDA tensors, not {device.type}"
    elif interpreting():
        why = "TRITON_INTERPRET=1 is set, and the interpreter cannot step CUDA tensors; unset it"
    elif not torch.cuda.is_available():
        why = "torch sees no CUDA device"
    else:
        _cuda_driver()
        why = f"Triton has no working CUDA driver ({_driver_error})"
    fallback = "'fused'" if device.type == "cpu" else "'foreach'"
    raise RuntimeError(f"impl='triton' cannot run on {device}: {why}; use impl={fallback} or 'for_loop'")


def kind(dtype: torch.dtype) -> int:
    """The storage kind constexpr of ``dtype`` (0 float32, 1 float64, 2 bfloat16, 3 float16)."""
    try:
        return KINDS[dtype]
    except KeyError:
        raise TypeError(f"the Triton kernels take {', '.join(map(str, KINDS))} tensors, got {dtype}") from None


def block_size() -> int:
    """Elements per program: 1024 on a GPU; 4096 in the interpreter (its cost is per program and op)."""
    return 4096 if interpreting() else 1024


def launch_count() -> int:
    """How many kernels :func:`launch` has started in this process (tests count launches per step)."""
    return _launches


class Tables(NamedTuple):
    """The device tables describing one bucket to a kernel (see the module docstring)."""

    ptrs: Tensor
    sizes: Tensor
    blocks: Tensor
    first: Tensor
    n_tensors: int
    n_blocks: int
    block: int


def _remember(cache: OrderedDict, key: tuple[Any, ...], make: Any) -> Any:
    with _lock:
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            return hit
    value = make()
    with _lock:
        cache[key] = value
        while len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    return value


def tables(lists: Sequence[Sequence[Tensor | None]], block: int | None = None) -> Tables:
    """The (cached) :class:`Tables` of ``lists``; ``lists[0]`` are the parameters, all contiguous.

    The cache is keyed by the pointers and sizes themselves, so a hit is always right (a freed
    tensor's address reused by another of the same size describes the same memory).
    """
    block = block or block_size()
    params = lists[0]
    device = params[0].device
    sizes = [p.numel() for p in params]
    ptrs = [0 if lst[t] is None else lst[t].data_ptr() for t in range(len(params)) for lst in lists]
    key = (device, block, len(lists), tuple(ptrs), tuple(sizes))

    def make() -> Tables:
        n = len(sizes)
        size_t = torch.tensor(sizes, dtype=torch.int64)
        counts = (size_t + block - 1) // block
        first = torch.zeros(n + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=first[1:])
        n_blocks = int(first[-1])
        owner = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), counts)
        start = (torch.arange(n_blocks, dtype=torch.int64) - first[:-1][owner]) * block
        blocks = torch.stack([owner, start], dim=1).reshape(-1)
        host = [torch.tensor(ptrs, dtype=torch.int64), size_t, blocks, first]
        dev = [x.to(device) for x in host]
        return Tables(*dev, n_tensors=n, n_blocks=n_blocks, block=block)

    return _remember(_tables, key, make)


def scalar_table(values: Sequence[float], device: torch.device, dtype: torch.dtype = torch.float64) -> Tensor:
    """A (cached) device tensor of per-tensor hyperparameters (e.g. GrokAdamW's layer-wise beta1)."""
    key = (device, dtype, tuple(float(v) for v in values))
    return _remember(_scalar_tables, key, lambda: torch.tensor(list(values), dtype=dtype).to(device))


def seed_table(stochastic: bool, seeds: Sequence[int] | None, n: int, device: torch.device) -> Tensor:
    """The ``SEEDS`` table of a launch over ``n`` tensors (``triton_common.store_param``): with
    ``stochastic`` the int64 keys ``precision.sr_key(seed)`` of each tensor's ``seeds`` entry (its step
    count; ``None``: seed 0), else a one-entry placeholder the kernel never reads. A runtime argument
    (cached like :func:`scalar_table`), so a new step never recompiles."""
    from lightning_opt.optim.precision import sr_keys

    keys = sr_keys(stochastic, seeds, n) or [0]
    key = (device, "seeds", tuple(keys))
    return _remember(_scalar_tables, key, lambda: torch.tensor(keys, dtype=torch.int64).to(device))


def _as_floats(values: Sequence[Any]) -> list[Any]:
    # the kernels declare hyperparameters float64: an int (lr=1) is passed as a float
    return [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in values]


def launch(kernel: Any, grid: int, *args: Any, **kwargs: Any) -> None:
    """Start ``kernel`` once on ``grid`` programs (counted by :func:`launch_count`); nothing for 0."""
    global _launches
    if grid <= 0:
        return
    with _lock:
        _launches += 1
    # no contraction of a * b + c: each kernel writes torch's fused multiply-adds out (tl.fma), so
    # the rounding follows the reference op for op
    kwargs.setdefault("enable_fp_fusion", False)
    device = next((a.device for a in args if isinstance(a, Tensor)), None)
    if device is not None and device.type == "cuda":
        with torch.cuda.device(device):
            kernel[(grid,)](*args, **kwargs)
    else:
        kernel[(grid,)](*args, **kwargs)


def contiguous_lists(
    lists: Sequence[Sequence[Tensor | None]],
    read_only: Sequence[int] = (1,),
) -> tuple[list[list[Tensor | None]], list[tuple[Tensor, Tensor]]]:
    """``lists`` with every tensor contiguous, and the (original, copy) pairs to write back after.

    Lists in ``read_only`` (the gradients, list 1 of every kernel) are not written back (an
    expanded gradient could not take the copy).

    Raises:
        ValueError: lists of different lengths, or a tensor whose size differs from its parameter's.
    """
    n = len(lists[0])
    out: list[list[Tensor | None]] = []
    write_back: list[tuple[Tensor, Tensor]] = []
    for j, lst in enumerate(lists):
        if len(lst) != n:
            raise ValueError(f"list {j} has {len(lst)} tensors, expected {n}")
        row: list[Tensor | None] = []
        for t, x in enumerate(lst):
            if x is not None:
                if x.numel() != lists[0][t].numel():
                    raise ValueError(f"tensor {t} of list {j} has {x.numel()} elements, expected {lists[0][t].numel()}")
                if not x.is_contiguous():
                    c = x.contiguous()
                    if j not in read_only:
                        write_back.append((x, c))
                    x = c
            row.append(x)
        out.append(row)
    return out, write_back


def elementwise(
    kernel: Any,
    lists: Sequence[Sequence[Tensor | None]],
    scalars: Sequence[Any] = (),
    **constexprs: Any,
) -> None:
    """One launch of an elementwise ``kernel`` over every tensor of ``lists`` (one bucket).

    The kernel's arguments are ``(PTRS, SIZES, BLOCKS, *scalars, L=len(lists), BLOCK=..., **constexprs)``
    (a scalar may be a tensor, passed as a pointer). Tensors that are not contiguous are stepped
    through contiguous copies that are written back (except the gradients, list 1).
    """
    if not lists[0]:
        return
    lists, write_back = contiguous_lists(lists)
    tab = tables(lists)
    args = _as_floats(scalars)
    launch(kernel, tab.n_blocks, tab.ptrs, tab.sizes, tab.blocks, *args, L=len(lists), BLOCK=tab.block, **constexprs)
    for orig, copy in write_back:
        orig.copy_(copy)


def reduce_then_apply(
    partial_kernel: Any,
    apply_kernel: Any,
    lists: Sequence[Sequence[Tensor | None]],
    scalars: Sequence[Any],
    *,
    k: int,
    out_dtype: torch.dtype | None = None,
    **constexprs: Any,
) -> Tensor | None:
    """Three launches for a kernel with ``k`` per-tensor sums (norms, RMS): partials, sums, apply.

    1. ``partial_kernel(PTRS, SIZES, BLOCKS, PART, *scalars, L, BLOCK, **constexprs)`` writes ``k``
       partial sums per program into ``PART[pid * k + j]`` (float64), reading but not writing the
       tensors;
    2. ``triton_common.segment_sums`` adds each tensor's partials in block order (deterministic,
       no atomics) into ``SUMS[t * k + j]``;
    3. ``apply_kernel(PTRS, SIZES, BLOCKS, SUMS, OUT, *scalars, L, BLOCK, **constexprs)`` updates
       the tensors; it may write one value per tensor into ``OUT`` (``out_dtype``, e.g. StableAdamW's
       clipped lr), which is returned (``None`` without ``out_dtype``).
    """
    from lightning_opt.kernels.triton_common import segment_sums

    if not lists[0]:
        return None
    lists, write_back = contiguous_lists(lists)
    tab = tables(lists)
    device = lists[0][0].device
    part = torch.empty(max(1, tab.n_blocks * k), dtype=torch.float64, device=device)
    sums = torch.empty(tab.n_tensors * k, dtype=torch.float64, device=device)  # segment_sums writes each
    out = sums
    if out_dtype is not None:
        out = torch.empty(tab.n_tensors, dtype=out_dtype, device=device)
        if any(x.numel() == 0 for x in lists[0]):
            out.fill_(float("nan"))  # an empty tensor has no block to write it: the mean over nothing
    common = {"L": len(lists), "BLOCK": tab.block, **constexprs}
    scalars = _as_floats(scalars)
    launch(partial_kernel, tab.n_blocks, tab.ptrs, tab.sizes, tab.blocks, part, *scalars, K=k, **common)
    launch(segment_sums, tab.n_tensors, tab.first, part, sums, K=k, RBLOCK=1024)
    launch(apply_kernel, tab.n_blocks, tab.ptrs, tab.sizes, tab.blocks, sums, out, *scalars, K=k, **common)
    for orig, copy in write_back:
        orig.copy_(copy)
    return out if out_dtype is not None else None


def by_value(values: Sequence[Any]) -> list[tuple[Any, list[int]]]:
    """The distinct ``values`` (per-tensor steps) in first-seen order, each with its tensor indices.

    Kernels take a step as runtime scalars, so a bucket whose tensors are at different steps (a
    tensor that had no gradient for a while) is launched once per distinct step; in the usual case
    every tensor is at the same step and this is one group.
    """
    groups: dict[Any, list[int]] = {}
    for i, v in enumerate(values):
        groups.setdefault(v, []).append(i)
    return list(groups.items())


def pick(lst: Sequence[Any], idx: Sequence[int]) -> list[Any]:
    """``[lst[i] for i in idx]`` (all of ``lst`` when ``idx`` covers it)."""
    return list(lst) if len(idx) == len(lst) else [lst[i] for i in idx]


def same_dtype(tensors: Sequence[Tensor | None], dtype: torch.dtype) -> list[Tensor | None]:
    """``tensors`` with each in ``dtype`` (a copy where it differs: a kernel reads a list as one dtype)."""
    return [t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors]
