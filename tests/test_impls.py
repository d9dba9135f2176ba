"""Every implementation of every registered optimizer equals its ``for_loop`` reference.

Driven by the registry: a name whose class (or factory) lists ``impls`` is stepped 20 times with each
impl on one parameter set of odd shapes ((1,), (5,), (1025,), (7, 3), (33, 65)), fp32 and bf16,
weight decay on and off, each rounding mode it offers (Kahan, stochastic), and compared with
``impl="for_loop"``: parameters and every state tensor, at float32 tolerance for fp32 parameters
and bfloat16 tolerance for bf16 ones (1.6e-2 relative, and absolute one bf16 step at the tensor's
scale: implementations that differ only in the last float32 bit round some elements to neighbouring
bf16 values).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_opt import available_optimizers, build_optimizer, get_optimizer_info
from lightning_opt.optim.registry import accepted_hparams
from tests.contract_overrides import OVERRIDES

SHAPES = {"gain": (1,), "scale": (5,), "bias": (1025,), "blocks.0.weight": (7, 3), "blocks.1.weight": (33, 65)}
STEPS = 20


def _impls(name: str) -> tuple[str, ...]:
    return tuple(getattr(get_optimizer_info(name).cls, "impls", ()))


def _roundings(name: str) -> list[dict]:
    taken = accepted_hparams(get_optimizer_info(name))
    modes = [{}]
    if "kahan_sum" in taken:
        modes.append({"kahan_sum": True})
    if "stochastic_rounding" in taken:
        modes.append({"stochastic_rounding": True})
    return modes


CASES = [
    pytest.param(name, impl, id=f"{name}-{impl}")
    for name in available_optimizers()
    for impl in _impls(name)
    if impl != "for_loop"
]


class _Params(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.params = nn.ParameterDict(
            {k.replace(".", "_"): nn.Parameter(torch.randn(s, generator=g).to(dtype)) for k, s in SHAPES.items()}
        )


def _run(name: str, impl: str, dtype: torch.dtype, wd: float, extra: dict) -> tuple[list, list]:
    model = _Params(dtype)
    spec = OVERRIDES.get(name, {})
    lr = spec.get("lr", get_optimizer_info(name).default_lr) * 10
    hparams = {**spec.get("hparams", {}), **extra}
    opt = build_optimizer(model, name, lr=lr, weight_decay=wd, impl=impl, **hparams)
    g = torch.Generator().manual_seed(1)
    params = list(model.parameters())
    for _ in range(STEPS):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)

        def closure() -> torch.Tensor:
            return torch.zeros(())

        opt.step(closure)
    state = []
    for p in params:
        for k, v in sorted(opt.state[p].items()):
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                state.append((k, v))
    return [p.detach() for p in params], state


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("name", "impl"), CASES)
def test_impl_equals_for_loop(name: str, impl: str, dtype: torch.dtype, wd: float) -> None:
    if wd and "weight_decay" not in accepted_hparams(get_optimizer_info(name)):
        pytest.skip(f"{name} takes no weight_decay")
    if dtype is torch.bfloat16 and _torch_backed(name):
        pytest.skip(
            f"{name} steps torch's class: its for_loop rounds every op to bf16, its fused kernel once per step; "
            "tests/optim/test_torch_builtin.py compares each impl with a float64 run instead"
        )
    for extra in _roundings(name):
        if extra and dtype is torch.float32:
            continue  # float32 parameters take the plain store whatever the rounding
        ref_p, ref_s = _run(name, "for_loop", dtype, wd, extra)
        got_p, got_s = _run(name, impl, dtype, wd, extra)
        for i, (a, b) in enumerate(zip(ref_p, got_p)):
            _close(b, a, f"{name} impl={impl} {extra} param {i}")
        assert [k for k, _ in ref_s] == [k for k, _ in got_s], f"{name} impl={impl}: state keys differ"
        for (k, a), (_, b) in zip(ref_s, got_s):
            _close(b, a, f"{name} impl={impl} {extra} state {k}")


def _close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype} != {ref.dtype}"
    if ref.dtype in (torch.bfloat16, torch.float16):
        step = torch.finfo(ref.dtype).eps * float(ref.abs().max())
        torch.testing.assert_close(got, ref, rtol=1.6e-2, atol=max(step, 1e-5), msg=lambda m: f"{what}: {m}")
    else:
        torch.testing.assert_close(got, ref, msg=lambda m: f"{what}: {m}")


def test_some_names_have_fast_impls() -> None:
    # the registry is what drives this file: it must not silently become empty
    assert {"lion"} <= {name for name in available_optimizers() if "fused" in _impls(name)}


def _torch_backed(name: str) -> bool:
    cls = get_optimizer_info(name).cls
    base = getattr(cls, "base", None)  # lookahead_<base>
    return hasattr(cls, "torch_class") or (base is not None and _torch_backed(base))


def _engine_class(name: str) -> bool:
    # our own classes (the torch-backed entries and lookahead_<base> are factories)
    return isinstance(get_optimizer_info(name).cls, type)


@pytest.mark.parametrize("name", [n for n in available_optimizers() if "fused" in _impls(n) and _engine_class(n)])
def test_auto_picks_fused_on_cpu_never_the_interpreter(name: str) -> None:
    from lightning_opt.optim.engine import resolve_impl

    p = torch.zeros(3)
    family_impls = _impls(name)
    # TRITON_INTERPRET=1 is set for the test session (tests/conftest.py): auto must still pick fused
    chosen = {resolve_impl(name, "auto", family_impls, p, fam) for fam in _families(name)}
    assert chosen == {"fused"}


def _families(name: str) -> list[str]:
    # the C source of a name's fused kernel: the module that defines its class
    cls = get_optimizer_info(name).cls
    return [cls.__module__.rsplit(".", 1)[-1]]


def test_unknown_impl_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="impl='fast'"):
        build_optimizer(nn.Linear(2, 2), "lion", lr=1e-3, impl="fast")


def test_fused_on_a_dtensor_or_wrong_device_says_what_to_use() -> None:
    from lightning_opt.optim.engine import resolve_impl

    with pytest.raises(RuntimeError, match="impl='triton' or 'foreach'"):
        resolve_impl("Lion", "fused", ("for_loop", "fused"), torch.zeros(2, device="meta"), "lion")
    with pytest.raises(RuntimeError, match="takes .*float32.*use impl='for_loop'"):
        resolve_impl("Lion", "fused", ("for_loop", "fused"), torch.zeros(2, dtype=torch.int32), "lion")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_opt.optim.engine import resolve_impl

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"impl='triton'\) needs CUDA tensors.*impl='fused'"):
        resolve_impl("Lion", "triton", ("for_loop", "triton"), torch.zeros(2), "lion")
