"""GrokAdamW: every ``impl`` equals the ``for_loop`` reference, and the fused state round-trips.

The comparison against the grokadamw package is in test_stable_grok.py (default ``impl="auto"``:
the fused kernel on the CPU). Tolerances are ``torch.testing.assert_close``'s defaults for the dtype,
for stochastic rounding too (the impls agree bit for bit on this CPU: see test_lamb_lars_impls).
"""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_opt.optim.grokadamw import GrokAdamW
from tests.optim._impl_harness import (
    PRECISIONS,
    _assert_same,
    _grads,
    _other_impls,
    _params,
    _rounding,
)


def _run(cls, impl: str, dtype: torch.dtype, grads, params=None, opt=None, frozen: int | None = None, **kw):
    """``frozen``: that tensor gets no gradient on odd steps (it shifts the layer index of the later ones)."""
    params = _params(dtype) if params is None else params
    opt = cls(params, impl=impl, **kw) if opt is None else opt
    opt.param_groups[0]["train_loss"], opt.param_groups[0]["eval_loss"] = 1.0, 1.5  # the default signal
    for t, step in enumerate(grads):
        for i, (p, g) in enumerate(zip(params, step)):
            p.grad = None if i == frozen and t % 2 else g.clone()
        opt.step()
    return params, opt


CASES = [
    {"weight_decay": 0.0},
    {"weight_decay": 0.1, "gradient_clipping": 0.0, "gamma": 0.3},
    {"weight_decay": 0.1, "gradient_clipping": 5.0, "frozen": 1},
]


@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("dtype, rounding", PRECISIONS)
@pytest.mark.parametrize("impl", _other_impls(GrokAdamW))
def test_impls_equal_for_loop(kw: dict, dtype: torch.dtype, rounding: str, impl: str) -> None:
    grads = _grads(dtype)
    kw = {"lr": 1e-2, **kw, **_rounding(rounding)}
    ours, ref = _run(GrokAdamW, impl, dtype, grads, **kw), _run(GrokAdamW, "for_loop", dtype, grads, **kw)
    _assert_same(*ours, *ref)


@pytest.mark.parametrize("kw", [CASES[0], CASES[2]])
@pytest.mark.parametrize("impl", _other_impls(GrokAdamW))
def test_stochastic_rounding_one_step(kw: dict, impl: str) -> None:
    """One step from the same state: every impl rounds stochastically with the shared hash (the
    reference's bits, so the same results), not to nearest."""
    grads = _grads(torch.bfloat16, 1)
    kw = {"lr": 1e-2, **kw}
    ours, _ = _run(GrokAdamW, impl, torch.bfloat16, grads, stochastic_rounding=True, **kw)
    ref, _ = _run(GrokAdamW, "for_loop", torch.bfloat16, grads, stochastic_rounding=True, **kw)
    nearest, _ = _run(GrokAdamW, "for_loop", torch.bfloat16, grads, **kw)
    a, b, c = (torch.cat([p.detach().float().reshape(-1) for p in ps]) for ps in (ours, ref, nearest))
    assert torch.equal(a, b)
    assert (b != c).float().mean() > 0.05  # rounding to nearest would differ on many elements


@pytest.mark.parametrize(
    "dtype, rounding", [(torch.float32, "nearest"), (torch.bfloat16, "kahan"), (torch.bfloat16, "stochastic")]
)
def test_fused_resume_equals_straight_run(dtype: torch.dtype, rounding: str) -> None:
    """N steps, save, load into a fresh optimizer, N steps == 2N steps (bit for bit)."""
    n = 6
    grads = _grads(dtype, 2 * n)
    kw = {"lr": 1e-2, "weight_decay": 0.1, **_rounding(rounding)}
    straight, _ = _run(GrokAdamW, "fused", dtype, grads, **kw)
    first, opt = _run(GrokAdamW, "fused", dtype, grads[:n], **kw)
    saved = copy.deepcopy(opt.state_dict())
    resumed = [p.detach().clone().requires_grad_() for p in first]
    fresh = GrokAdamW(resumed, impl="fused", **kw)
    fresh.load_state_dict(saved)
    _run(GrokAdamW, "fused", dtype, grads[n:], params=resumed, opt=fresh)
    for a, b in zip(straight, resumed):
        assert torch.equal(a.detach(), b.detach())


def test_impl_and_rounding_options_are_checked() -> None:
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match=r"GrokAdamW\(impl='fuzed'\)"):
        GrokAdamW(p, impl="fuzed")
    with pytest.raises(ValueError, match="choose one rounding"):
        GrokAdamW(p, kahan_sum=True, stochastic_rounding=True)
    opt = GrokAdamW(p)
    with pytest.raises(ValueError, match=r"impl='cuda'"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "impl": "cuda"})
    for group in opt.param_groups:  # as unpickled from before the options
        del group["impl"], group["stochastic_rounding"]
    opt.__setstate__(opt.__getstate__())
    assert opt.param_groups[0]["impl"] == "auto" and opt.param_groups[0]["stochastic_rounding"] is False
