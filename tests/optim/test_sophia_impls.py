"""SophiaG and SophiaH: every ``impl`` of the step equals the ``for_loop`` reference, and the fused state round-trips.

The Hessian EMA refresh (``update_hessian``) is per tensor in every impl. The comparisons against
the official code and pytorch_optimizer are in test_sophia.py (default ``impl="auto"``: the fused
kernel on the CPU). Tolerances are ``torch.testing.assert_close``'s defaults for the dtype,
for stochastic rounding too (the impls agree bit for bit on this CPU: see test_lamb_lars_impls).
"""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_opt.optim.sophia import SophiaG, SophiaH
from tests.optim._impl_harness import (
    PRECISIONS,
    SHAPES,
    STEPS,
    _assert_same,
    _grads,
    _other_impls,
    _params,
    _rounding,
)


def _estimates(dtype: torch.dtype, steps: int = STEPS) -> list[list[torch.Tensor]]:
    # Hutchinson estimates can be negative (the eps floor then gives full sign steps)
    g = torch.Generator().manual_seed(2)
    return [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(steps)]


def _run(cls, impl: str, dtype: torch.dtype, grads, start: int = 0, params=None, opt=None, **kw):
    """Steps ``start..`` of a run; the Hessian EMA is refreshed every 5 steps (the paper's k = 10 is slower)."""
    params = _params(dtype) if params is None else params
    opt = cls(params, impl=impl, **kw) if opt is None else opt
    est = _estimates(dtype, start + len(grads))
    for t, step in enumerate(grads, start):
        for p, g in zip(params, step):
            p.grad = g.clone()
        if t % 5 == 0:
            opt.update_hessian(None if cls is SophiaG else est[t])  # SophiaG: p.grad ** 2
        opt.step()
    return params, opt


CASES = [
    (SophiaG, {"lr": 1e-2, "weight_decay": 0.0}),
    (SophiaG, {"lr": 1e-2, "weight_decay": 0.1, "rho": 0.01, "bs": 100}),
    (SophiaH, {"lr": 1e-2, "weight_decay": 0.0}),
    (SophiaH, {"lr": 1e-2, "weight_decay": 0.2, "rho": 1.0, "eps": 1e-3}),
]


@pytest.mark.parametrize("cls, kw", CASES)
@pytest.mark.parametrize("dtype, rounding", PRECISIONS)
@pytest.mark.parametrize("impl", _other_impls(SophiaG))
def test_impls_equal_for_loop(cls, kw: dict, dtype: torch.dtype, rounding: str, impl: str) -> None:
    grads = _grads(dtype)
    kw = {**kw, **_rounding(rounding)}
    ours, ref = _run(cls, impl, dtype, grads, **kw), _run(cls, "for_loop", dtype, grads, **kw)
    _assert_same(*ours, *ref)
    if dtype == torch.bfloat16:
        assert all(ours[1].state[p]["exp_avg"].dtype == torch.float32 for p in ours[0])


@pytest.mark.parametrize("cls, kw", [CASES[1], CASES[3]])
@pytest.mark.parametrize("impl", _other_impls(SophiaG))
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


@pytest.mark.parametrize("cls, kw", [CASES[1], CASES[3]])
@pytest.mark.parametrize(
    "dtype, rounding", [(torch.float32, "nearest"), (torch.bfloat16, "kahan"), (torch.bfloat16, "stochastic")]
)
def test_fused_resume_equals_straight_run(cls, kw: dict, dtype: torch.dtype, rounding: str) -> None:
    """N steps, save, load into a fresh optimizer, N steps == 2N steps (bit for bit); float32 state stays float32."""
    n = 7  # the refresh at step 10 falls after the resume
    grads = _grads(dtype, 2 * n)
    kw = {**kw, **_rounding(rounding)}
    straight, _ = _run(cls, "fused", dtype, grads, **kw)
    first, opt = _run(cls, "fused", dtype, grads[:n], **kw)
    saved = copy.deepcopy(opt.state_dict())
    resumed = [p.detach().clone().requires_grad_() for p in first]
    fresh = cls(resumed, impl="fused", **kw)
    fresh.load_state_dict(saved)
    assert all(fresh.state[p]["hessian"].dtype == opt.state[q]["hessian"].dtype for p, q in zip(resumed, first))
    _run(cls, "fused", dtype, grads[n:], start=n, params=resumed, opt=fresh)
    for a, b in zip(straight, resumed):
        assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("cls", [SophiaG, SophiaH])
def test_impl_and_rounding_options_are_checked(cls) -> None:
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match=rf"{cls.__name__}\(impl='fuzed'\)"):
        cls(p, impl="fuzed")
    with pytest.raises(ValueError, match="choose one rounding"):
        cls(p, kahan_sum=True, stochastic_rounding=True)
    opt = cls(p)
    with pytest.raises(ValueError, match=r"impl='cuda'"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "impl": "cuda"})
    for group in opt.param_groups:  # as unpickled from before the options
        del group["impl"], group["stochastic_rounding"]
    opt.__setstate__(opt.__getstate__())
    assert opt.param_groups[0]["impl"] == "auto" and opt.param_groups[0]["stochastic_rounding"] is False
