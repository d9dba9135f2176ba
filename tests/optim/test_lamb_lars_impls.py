"""Lamb and Lars: every ``impl`` equals the ``for_loop`` reference, and the fused state round-trips.

The reference comparisons against pytorch_optimizer and hand recurrences are in test_lamb_lars.py
(they run the default ``impl="auto"``, the fused kernel on the CPU). Tolerances are
``torch.testing.assert_close``'s defaults for the parameter dtype, for stochastic rounding too: the
kernels mirror torch's roundings and every impl takes float64-accumulated norms and correctly
rounded roots, so they agree (measured: bit for bit on this CPU).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from lightning_opt.optim.lamb_lars import Lamb, Lars
from tests.optim._impl_harness import (
    PRECISIONS,
    _assert_same,
    _grads,
    _other_impls,
    _params,
    _rounding,
)


def _run(cls, impl: str, dtype: torch.dtype, grads, late: int | None = None, **kw):
    """``late``: that tensor gets no gradient for the first 3 steps (its step count and momentum
    buffer start later than the others')."""
    params = _params(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no param group is adapted" for the wd=0 cases, on purpose
        opt = cls(params, impl=impl, **kw)
    for t, step in enumerate(grads):
        for i, (p, g) in enumerate(zip(params, step)):
            p.grad = None if i == late and t < 3 else g.clone()
        opt.step()
    return params, opt


LAMB_CASES = [
    {"weight_decay": 0.0, "late": 2},  # not adapted (NVLAMB: wd=0 groups get plain Adam)
    {"weight_decay": 0.0, "always_adapt": True, "trust_clip": True},
    {"weight_decay": 0.1, "grad_averaging": False},
    {"weight_decay": 0.1, "bias_correction": False, "max_grad_norm": 0.0},
]


@pytest.mark.parametrize("impl", _other_impls(Lamb))
@pytest.mark.parametrize("dtype, rounding", PRECISIONS)
@pytest.mark.parametrize("kw", LAMB_CASES)
def test_lamb_impls_equal_for_loop(impl: str, dtype: torch.dtype, rounding: str, kw: dict) -> None:
    grads = _grads(dtype)
    kw = {"lr": 1e-2, **kw, **_rounding(rounding)}
    ours, ref = _run(Lamb, impl, dtype, grads, **kw), _run(Lamb, "for_loop", dtype, grads, **kw)
    _assert_same(*ours, *ref)


LARS_CASES = [
    {"weight_decay": 0.0, "late": 2},  # not adapted: torch SGD with momentum
    {"weight_decay": 0.0, "always_adapt": True, "momentum": 0.0},
    {"weight_decay": 1e-2, "nesterov": True},
    {"weight_decay": 1e-2, "dampening": 0.1, "trust_clip": True, "late": 4},
]


@pytest.mark.parametrize("impl", _other_impls(Lars))
@pytest.mark.parametrize("dtype, rounding", PRECISIONS)
@pytest.mark.parametrize("kw", LARS_CASES)
def test_lars_impls_equal_for_loop(impl: str, dtype: torch.dtype, rounding: str, kw: dict) -> None:
    grads = _grads(dtype)
    kw = {"lr": 0.5, **kw, **_rounding(rounding)}
    ours, ref = _run(Lars, impl, dtype, grads, **kw), _run(Lars, "for_loop", dtype, grads, **kw)
    _assert_same(*ours, *ref)


@pytest.mark.parametrize(
    "cls, kw",
    [
        (Lamb, {"lr": 1e-2, "weight_decay": 0.1}),
        (Lars, {"lr": 0.5, "weight_decay": 1e-2, "nesterov": True}),
    ],
)
@pytest.mark.parametrize(
    "dtype, rounding", [(torch.float32, "nearest"), (torch.bfloat16, "kahan"), (torch.bfloat16, "stochastic")]
)
def test_fused_resume_equals_straight_run(cls, kw: dict, dtype: torch.dtype, rounding: str) -> None:
    """N steps, save, load into a fresh optimizer, N steps == 2N steps (bit for bit)."""
    n = 6
    grads = _grads(dtype, 2 * n)
    kw = {**kw, **_rounding(rounding), "impl": "fused"}
    straight, _ = _run(cls, "fused", dtype, grads, **{k: v for k, v in kw.items() if k != "impl"})

    first, opt = _run(cls, "fused", dtype, grads[:n], **{k: v for k, v in kw.items() if k != "impl"})
    saved = copy.deepcopy(opt.state_dict())
    resumed = [p.detach().clone().requires_grad_() for p in first]
    fresh = cls(resumed, **kw)
    fresh.load_state_dict(saved)
    for step in grads[n:]:
        for p, g in zip(resumed, step):
            p.grad = g.clone()
        fresh.step()
    for a, b in zip(straight, resumed):
        assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize(
    "cls, kw",
    [
        (Lamb, {"lr": 1e-2, "weight_decay": 0.1}),
        (Lamb, {"lr": 1e-2, "weight_decay": 0.0}),
        (Lars, {"lr": 0.5, "weight_decay": 1e-2}),
    ],
)
@pytest.mark.parametrize("impl", _other_impls(Lamb))
def test_stochastic_rounding_one_step(cls, kw: dict, impl: str) -> None:
    """One step from the same state: every impl rounds stochastically with the shared hash (the
    reference's bits, so the same results), not to nearest."""
    grads = _grads(torch.bfloat16, 1)
    ours, _ = _run(cls, impl, torch.bfloat16, grads, stochastic_rounding=True, **kw)
    ref, _ = _run(cls, "for_loop", torch.bfloat16, grads, stochastic_rounding=True, **kw)
    nearest, _ = _run(cls, "for_loop", torch.bfloat16, grads, **kw)
    a, b, c = (torch.cat([p.detach().float().reshape(-1) for p in ps]) for ps in (ours, ref, nearest))
    assert torch.equal(a, b)
    assert (b != c).float().mean() > 0.05  # rounding to nearest would differ on many elements


def test_fused_is_deterministic_across_thread_counts() -> None:
    """The trust-ratio norms are summed per chunk in chunk order: the thread count changes nothing."""
    big = [(40000,), (70000,)]
    g = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=g) for s in big]
    grads = [[torch.randn(s, generator=g) for s in big] for _ in range(3)]
    results = []
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            params = [x.clone().requires_grad_() for x in init]
            opt = Lamb(params, lr=1e-2, weight_decay=0.1, impl="fused")
            for step in grads:
                for p, gr in zip(params, step):
                    p.grad = gr.clone()
                opt.step()
            results.append([p.detach() for p in params])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [Lamb, Lars])
def test_impl_and_rounding_options_are_checked(cls) -> None:
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match=r"impl='fuzed'"):
        cls(p, impl="fuzed", weight_decay=0.1)
    with pytest.raises(ValueError, match="choose one rounding"):
        cls(p, kahan_sum=True, stochastic_rounding=True, weight_decay=0.1)
    opt = cls(p, weight_decay=0.1)
    with pytest.raises(ValueError, match=r"impl='cuda'"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "impl": "cuda"})
    for group in opt.param_groups:  # as unpickled from before the options
        del group["impl"], group["stochastic_rounding"]
    opt.__setstate__(opt.__getstate__())
    assert opt.param_groups[0]["impl"] == "auto" and opt.param_groups[0]["stochastic_rounding"] is False
