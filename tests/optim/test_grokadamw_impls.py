"""GrokAdamW: every ``impl`` equals the ``for_loop`` reference, and the fused state round-trips.

The comparison against the grokadamw package is in test_stable_grok.py (default ``impl="auto"``:
the fused kernel on the CPU). Tolerances are ``torch.testing.assert_close``'s defaults for the dtype,
for stochastic rounding too (the impls agree bit for bit on this CPU: see test_lamb_lars_impls).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from lightning_opt.optim.grokadamw import GrokAdamW

SHAPES = [(1,), (5,), (1025,), (7, 3), (33, 65)]
STEPS = 20

# (param dtype, rounding): stochastic rounding exists for bfloat16 only
PRECISIONS = [
    (torch.float32, "nearest"),
    (torch.float32, "kahan"),
    (torch.bfloat16, "nearest"),
    (torch.bfloat16, "kahan"),
    (torch.bfloat16, "stochastic"),
]


def _other_impls(cls) -> list[str]:
    # the Triton kernels run on the CPU only in the interpreter
    keep = ("triton",) if os.environ.get("TRITON_INTERPRET") == "1" else ()
    return [i for i in cls.impls if i != "for_loop" and (i != "triton" or i in keep)]


def _params(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in SHAPES]


def _grads(dtype: torch.dtype, steps: int = STEPS) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [[torch.randn(s, generator=g).to(dtype) for s in SHAPES] for _ in range(steps)]


def _rounding(rounding: str) -> dict:
    return {"kahan_sum": rounding == "kahan", "stochastic_rounding": rounding == "stochastic"}


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


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    # stochastic rounding too: its bits hash the unrounded float32 value, so this holds only because
    # every impl computes that value with torch's roundings (the kernels mirror torch's FMAs, take
    # float64-accumulated norms and correctly rounded roots; the reference takes the same)
    torch.testing.assert_close(a, b, msg=lambda m: f"{what}: {m}")


def _assert_same(a_params, a_opt, b_params, b_opt) -> None:
    for pa, pb in zip(a_params, b_params):
        assert pa.dtype == pb.dtype
        _close(pa.detach(), pb.detach(), "param")
        sa, sb = a_opt.state[pa], b_opt.state[pb]
        assert sa.keys() == sb.keys()
        for key in sa:
            if key == "kahan_comp":
                # the buffer is p's rounding residue: a one-ulp difference in p moves it by that ulp,
                # so compare the value p + comp that the pair represents (in float32), up to a few
                # ulps of the bf16 buffer itself (|comp| reaches a few ulps of p: rtol 2**-10 of p)
                assert sa[key].dtype == sb[key].dtype == pa.dtype
                torch.testing.assert_close(
                    pa.detach().float() + sa[key].float(),
                    pb.detach().float() + sb[key].float(),
                    rtol=2**-10,
                    atol=1e-5,
                )
            elif isinstance(sa[key], torch.Tensor):
                assert sa[key].dtype == sb[key].dtype, key
                _close(sa[key], sb[key], f"state {key!r}")
            else:
                assert sa[key] == sb[key], key


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
