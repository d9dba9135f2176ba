"""Kahan summation (``kahan_sum=True``): against torch-optimi in bf16, and its effect on bf16 weights."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_opt.optim.precision import apply_update_, kahan_add_, new_kahan_comp
from lightning_opt.optim.grokadamw import GrokAdamW
from lightning_opt.optim.lamb_lars import Lamb, Lars
from lightning_opt.optim.lion import Lion
from lightning_opt.optim.stable_adamw import StableAdamW

optimi = pytest.importorskip("optimi")

SHAPES = [(16, 8), (8,)]

# each optimizer with settings whose per-step update (about 1e-4) is below bf16's resolution at
# |p| ~ 1 (2**-8 = 3.9e-3; anything under half of it rounds away)
KAHAN_OPTIMIZERS = {
    "lion": lambda ps, **kw: Lion(ps, lr=1e-4, **kw),
    "stable_adamw": lambda ps, **kw: StableAdamW(ps, lr=1e-4, weight_decay=0.0, **kw),
    "grokadamw": lambda ps, **kw: GrokAdamW(ps, lr=1e-4, weight_decay=0.0, **kw),
    "lamb": lambda ps, **kw: Lamb(ps, lr=1e-4, weight_decay=0.0, always_adapt=True, **kw),
    "lars": lambda ps, **kw: Lars(ps, lr=0.1, trust_coeff=1e-3, momentum=0.0, always_adapt=True, **kw),
}


def _params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(1.0 + 0.1 * torch.rand(s, generator=g)).to(dtype).requires_grad_() for s in SHAPES]


def _run(make_opt, params, steps: int, seed: int = 1) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    opt = make_opt(params)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            # a consistent gradient direction plus noise, so updates accumulate instead of cancelling
            p.grad = (1.0 + 0.3 * torch.randn(p.shape, generator=g)).to(p.dtype)
        opt.step()
    return [p.detach().clone() for p in params], opt


def test_kahan_add_accumulates_below_resolution() -> None:
    p = torch.ones(4, dtype=torch.bfloat16)
    c = new_kahan_comp(p)
    plain = p.clone()
    for _ in range(1000):
        kahan_add_(p, torch.full((4,), 1e-4), c)
        apply_update_(plain, torch.full((4,), 1e-4), None)
    assert torch.equal(plain, torch.ones(4, dtype=torch.bfloat16)), "plain bf16 adds should round away"
    # the exact sum is 1.1; bf16's spacing there is 2**-7 = 7.8e-3, and c is bf16 too
    torch.testing.assert_close(p.float(), torch.full((4,), 1.1), rtol=0, atol=4e-3)
    assert new_kahan_comp(torch.ones(2)) is None  # float32 needs no buffer


@pytest.mark.parametrize("name", list(KAHAN_OPTIMIZERS))
def test_bf16_updates_below_resolution_move_only_with_kahan(name: str) -> None:
    make = KAHAN_OPTIMIZERS[name]
    start = [p.detach().clone() for p in _params(torch.bfloat16)]
    plain, _ = _run(lambda ps: make(ps), _params(torch.bfloat16), steps=200)
    kahan, opt = _run(lambda ps: make(ps, kahan_sum=True), _params(torch.bfloat16), steps=200)
    ideal, _ = _run(lambda ps: make(ps), _params(torch.float32), steps=200)
    for s, a, b, ref in zip(start, plain, kahan, ideal):
        assert torch.equal(a, s), f"{name}: without kahan_sum these updates should round away in bf16"
        assert (b.float() - s.float()).abs().max() > 5e-3, f"{name}: kahan_sum=True did not move the weights"
        # and the compensated bf16 trajectory tracks the float32 one to within bf16 resolution
        torch.testing.assert_close(b.float(), ref, rtol=0, atol=8e-3)
    assert all(opt.state[p]["kahan_comp"].dtype == torch.bfloat16 for g in opt.param_groups for p in g["params"])


@pytest.mark.parametrize("name", list(KAHAN_OPTIMIZERS))
def test_no_buffer_for_float32(name: str) -> None:
    _, opt = _run(lambda ps: KAHAN_OPTIMIZERS[name](ps, kahan_sum=True), _params(torch.float32), steps=2)
    assert all("kahan_comp" not in opt.state[p] for g in opt.param_groups for p in g["params"])


@pytest.mark.parametrize("name", list(KAHAN_OPTIMIZERS))
def test_kahan_state_round_trips(name: str) -> None:
    """bf16 params with kahan_sum: N steps + save + load + N steps == 2N steps."""
    make = KAHAN_OPTIMIZERS[name]
    straight, _ = _run(lambda ps: make(ps, kahan_sum=True), _params(torch.bfloat16), steps=8)
    params = _params(torch.bfloat16)
    _, opt = _run(lambda ps: make(ps, kahan_sum=True), params, steps=4)
    saved_params, saved_opt = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
    assert "kahan_comp" in saved_opt["state"][0]
    fresh = [p.detach().clone().requires_grad_() for p in saved_params]
    opt2 = make(fresh, kahan_sum=True)
    opt2.load_state_dict(saved_opt)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):  # replay the generator to the same point: the first 4 steps' grads
        for p in fresh:
            torch.randn(p.shape, generator=g)
    for _ in range(4):
        for p in fresh:
            p.grad = (1.0 + 0.3 * torch.randn(p.shape, generator=g)).to(p.dtype)
        opt2.step()
    for a, b in zip(straight, fresh):
        assert torch.equal(a, b.detach())


# ------------------------------------------------------------ against torch-optimi's kahan_sum


def _optimi_run(make_opt, dtype, steps=20):
    return _run(make_opt, _params(dtype), steps=steps)[0]


def test_lion_kahan_matches_optimi_bf16() -> None:
    kw = {"betas": (0.9, 0.99), "weight_decay": 0.1}
    ours = _optimi_run(lambda ps: Lion(ps, lr=3e-4, kahan_sum=True, **kw), torch.bfloat16)
    ref = _optimi_run(
        lambda ps: optimi.Lion(ps, lr=3e-4, kahan_sum=True, foreach=False, triton=False, **kw), torch.bfloat16
    )
    for a, b in zip(ours, ref):
        # bitwise equal (one bf16 ulp, 7.8e-3 here, is what a missing compensation costs)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_stable_adamw_kahan_matches_optimi_bf16() -> None:
    kw = {"betas": (0.9, 0.99), "weight_decay": 0.1, "eps": 1e-6}
    ours = _optimi_run(lambda ps: StableAdamW(ps, lr=3e-4, kahan_sum=True, **kw), torch.bfloat16)
    ref = _optimi_run(
        lambda ps: optimi.StableAdamW(ps, lr=3e-4, kahan_sum=True, foreach=False, triton=False, **kw), torch.bfloat16
    )
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # optimi's kahan_sum is really on here: without it, its weights differ from ours
    plain = _optimi_run(
        lambda ps: optimi.StableAdamW(ps, lr=3e-4, kahan_sum=False, foreach=False, triton=False, **kw), torch.bfloat16
    )
    assert not all(torch.equal(a, b) for a, b in zip(ours, plain))
