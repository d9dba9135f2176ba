"""The optimizer engine: implementation choice and multi-tensor dispatch, shared by every family.

Infrastructure (registers nothing). torch.optim's split: a class validates its options and gathers
per-group tensor lists (``_init_group``); one list-level function per family does the math; this
module picks, per (device, dtype) bucket of a group, which implementation of that function runs:

- ``"for_loop"``: one tensor at a time (the reference; every other impl must equal it);
- ``"foreach"``: multi-tensor ``torch._foreach_*`` ops (fewest launches on a GPU);
- ``"fused"``: one fused C kernel per bucket on the CPU (:mod:`lightning_opt.kernels.cpu`), a single
  pass over memory; built once per machine with the system C compiler;
- ``"triton"``: one Triton launch per bucket on CUDA (:mod:`lightning_opt.kernels.triton_launcher`);
  on the CPU only under ``TRITON_INTERPRET=1`` (the interpreter, for tests);
- ``"auto"`` (the default): ``triton`` on CUDA when Triton works there (``foreach`` otherwise),
  ``fused`` on the CPU when the kernel library builds (``for_loop`` otherwise: on the CPU torch's
  ``foreach`` ops are no faster than its loop), ``for_loop`` for DTensor (FSDP2) shards.

An impl the optimizer does not have is refused when it is constructed; one that cannot run where it
is asked to (``"fused"`` on a GPU, ``"triton"`` on a CPU, either on a DTensor) raises at the first
step with the impl to use instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from lightning_opt.optim.precision import is_dtensor, local, shard_groups, shard_local

__all__ = ["IMPLS", "Impl", "check_impl", "dispatch", "is_dtensor", "resolve_impl"]

Impl = Literal["auto", "for_loop", "foreach", "fused", "triton"]
IMPLS: tuple[str, ...] = get_args(Impl)

#: dtypes the fused CPU kernels and the Triton kernels take for parameters
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_impl(cls: str, impl: Any, supported: Sequence[str]) -> str:
    """``impl`` if it is ``"auto"`` or one of ``supported``, else ``ValueError`` naming ``cls``.

    Call it in ``__init__`` (and for a group's own ``impl`` in ``add_param_group``) so a typo or
    an impl the family lacks fails at construction.
    """
    choices = ("auto", *supported)
    if not isinstance(impl, str) or impl not in choices:
        raise ValueError(f"{cls}(impl={impl!r}) is invalid; expected one of {choices}")
    return impl


def _triton_usable(device: torch.device) -> bool:
    from lightning_opt.kernels import triton_launcher

    return triton_launcher.usable(device)


def _fused_usable(family: str) -> bool:
    from lightning_opt.kernels import cpu

    return cpu.available(family)


def resolve_impl(cls: str, impl: str, supported: Sequence[str], sample: Tensor, family: str) -> str:
    """The impl that runs for a bucket whose tensors are like ``sample`` (same device and dtype).

    ``family`` names the family's fused CPU kernel source (``kernels/csrc/<family>.c``).

    Raises:
        RuntimeError: an explicit ``impl`` cannot run on ``sample``'s device, dtype or tensor type,
            with the impl to use instead.
    """
    device = sample.device
    dtensor = is_dtensor(sample)
    if impl == "auto":
        if dtensor:
            return "for_loop"
        if device.type == "cuda":
            if "triton" in supported and sample.dtype in KERNEL_DTYPES and _triton_usable(device):
                return "triton"
            return "foreach" if "foreach" in supported else "for_loop"
        if device.type == "cpu" and "fused" in supported and sample.dtype in KERNEL_DTYPES and _fused_usable(family):
            return "fused"
        return "for_loop"
    if impl in ("fused", "triton"):
        if dtensor:
            raise RuntimeError(
                f"{cls}(impl={impl!r}) steps plain tensors, got a DTensor (FSDP2 shard); use impl='auto' or 'for_loop'"
            )
        if sample.dtype not in KERNEL_DTYPES:
            raise RuntimeError(
                f"{cls}(impl={impl!r}) takes {', '.join(str(d) for d in KERNEL_DTYPES)} parameters, got "
                f"{sample.dtype}; use impl='for_loop'"
            )
    if impl == "fused":
        if device.type != "cpu":
            raise RuntimeError(
                f"{cls}(impl='fused') is the CPU kernel; the parameters are on {device}: use impl='triton' or 'foreach'"
            )
        from lightning_opt.kernels import cpu

        cpu.require(family)
    elif impl == "triton":
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if device.type != "cuda" and not (device.type == "cpu" and interpret):
            raise RuntimeError(
                f"{cls}(impl='triton') needs CUDA tensors (the parameters are on {device}); on the CPU use "
                "impl='fused', or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter"
            )
        from lightning_opt.kernels import triton_launcher

        triton_launcher.require(device)
    return impl


def _bucket_key(t: Tensor) -> tuple[Any, ...]:
    if is_dtensor(t):
        return (t.device, t.dtype, True, id(t.device_mesh), tuple(t.placements))
    return (t.device, t.dtype, False)


def _as_shard(result: Any, param: Tensor) -> Any:
    """A per-tensor result shaped like ``param``'s local shard (new state, e.g. a momentum buffer)
    as a DTensor laid out like ``param``; anything else (a 0-d clipped lr) unchanged."""
    if isinstance(result, Tensor) and result.dim() > 0 and result.shape == param.to_local().shape:
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            result, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        )
    return result


def dispatch(
    cls: str,
    family: str,
    impl: str,
    impls: Mapping[str, Callable[..., Any]],
    lists: Mapping[str, Sequence[Any]],
    reduces: bool = False,
    **hparams: Any,
) -> list[Any]:
    """Run the family's list-level function for each (device, dtype) bucket of ``lists``.

    DTensor parameters (FSDP2 shards) are bucketed by mesh and placements too, and each such bucket
    runs on the local tensors (``to_local()``, views that share storage) inside
    :func:`~lightning_opt.optim.precision.shard_local`: elementwise math stays local and takes the
    same impl as plain tensors would (the fused kernel on CPU), while the per-tensor reductions of
    the shared precision service (``tensor_norms``, ``tensor_abs_means``) add the shards' partial
    sums in one all-reduce per call. A family with per-tensor reductions passes ``reduces=True``:
    on shards ``auto`` then takes ``foreach`` (one collective for the bucket; ``for_loop`` would do
    one per tensor, and the fused/triton kernels reduce inside the kernel, so they refuse shards).

    Args:
        cls: the optimizer's name, for errors.
        family: the stem of the family's fused CPU kernel source (``kernels/csrc/<family>.c``).
        impl: the group's ``impl`` option.
        impls: the family's implementations by name (``"for_loop"`` is required; it is also the
            fallback ``"auto"`` takes).
        lists: equally long lists keyed by argument name; the first is the parameters, which decide
            the buckets. Entries may be ``None`` (an absent Kahan buffer).
        hparams: keyword arguments passed unchanged to every call.

    Returns:
        The per-tensor results (whatever each implementation returns per tensor, e.g. StableAdamW's
        clipped lr), in the order of ``lists``, or ``[]`` when the implementations return ``None``.
    """
    names = list(lists)
    params = lists[names[0]]
    if not params:
        return []
    buckets: dict[tuple[Any, ...], list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault(_bucket_key(p), []).append(i)
    supported = tuple(impls)
    results: list[Any] = [None] * len(params)
    any_result = False
    for idx in buckets.values():
        sample = params[idx[0]]
        sliced = {n: [lists[n][i] for i in idx] for n in names}
        if not is_dtensor(sample):
            out = impls[resolve_impl(cls, impl, supported, sample, family)](**sliced, **hparams)
        else:
            groups = shard_groups(cls, sample)
            if reduces and groups:
                if impl in ("fused", "triton"):
                    raise RuntimeError(
                        f"{cls}(impl={impl!r}) reduces each tensor inside the kernel, which cannot see the other "
                        "shards of an FSDP2 parameter; use impl='auto' or 'foreach' (one all-reduce per step)"
                    )
                chosen = ("foreach" if "foreach" in supported else "for_loop") if impl == "auto" else impl
            else:
                chosen = resolve_impl(cls, impl, supported, local(sample), family)
            with shard_local(groups):
                out = impls[chosen](**{n: [local(x) for x in v] for n, v in sliced.items()}, **hparams)
            if out is not None:
                out = [_as_shard(r, params[i]) for i, r in zip(idx, out)]
        if out is not None:
            any_result = True
            for i, r in zip(idx, out):
                results[i] = r
    return results if any_result else []
