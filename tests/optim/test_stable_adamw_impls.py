"""StableAdamW's implementations: every impl equals ``for_loop`` (and optimi), the fused RMS is deterministic.

``for_loop`` (:func:`stable_adamw_update_` per tensor) is the reference. The others differ from it only
in the last float32 bit of the per-tensor RMS (another summation order), so fp32 parameters are
compared at float32 tolerance and bf16 ones at bf16 tolerance (one bf16 step at the tensor's scale).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_opt.optim.stable_adamw import StableAdamW, stable_adamw

IMPLS = [impl for impl in StableAdamW.impls if impl != "for_loop"]
SHAPES = [(1,), (5,), (1025,), (7, 3), (33, 65)]
MODES = {
    "plain": {},
    "kahan": {"kahan_sum": True},
    "stochastic": {"stochastic_rounding": True},
    "decouple_lr": {"decouple_lr": True},
}


class _Shapes(nn.Module):
    """One parameter of each odd shape (a 1-element tensor, a non-multiple of the SIMD width, ...)."""

    def __init__(self, dtype: torch.dtype, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.ps = nn.ParameterList([nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES])


def _set_grads(model: _Shapes, g: torch.Generator, t: int) -> None:
    for i, p in enumerate(model.ps):
        grad = torch.randn(p.shape, generator=g)
        if t == 12:
            grad = grad * 50.0  # a loss spike: the update clipping engages
        p.grad = grad.to(p.dtype)
    if t == 5:
        model.ps[0].grad = None  # it sits out a step: its own step count (and debiased betas) lag


def _run(impl: str, dtype: torch.dtype, steps: int = 20, wd: float = 0.1, **kw) -> tuple[_Shapes, StableAdamW]:
    model = _Shapes(dtype)
    opt = StableAdamW(model.parameters(), lr=1e-2, weight_decay=wd, impl=impl, **kw)
    g = torch.Generator().manual_seed(1)
    for t in range(steps):
        _set_grads(model, g, t)
        opt.step()
    return model, opt


def _close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.dtype == ref.dtype, what
    if ref.dtype == torch.bfloat16:
        step = torch.finfo(torch.bfloat16).eps * float(ref.abs().max())
        torch.testing.assert_close(got, ref, rtol=1.6e-2, atol=max(step, 1e-5), msg=lambda m: f"{what}: {m}")
    else:
        torch.testing.assert_close(got, ref, msg=lambda m: f"{what}: {m}")


# float32 parameters take the plain store whatever the rounding: the roundings run on bf16 only
DTYPE_MODES = [
    pytest.param(dtype, mode, id=f"{name}-{mode}")
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
    for mode in MODES
    if dtype is torch.bfloat16 or mode not in ("kahan", "stochastic")
]


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize(("dtype", "mode"), DTYPE_MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_impl_equals_for_loop(impl: str, dtype: torch.dtype, mode: str, wd: float) -> None:
    ref_m, ref_o = _run("for_loop", dtype, wd=wd, **MODES[mode])
    got_m, got_o = _run(impl, dtype, wd=wd, **MODES[mode])
    for i, (a, b) in enumerate(zip(ref_m.ps, got_m.ps)):
        _close(b.detach(), a.detach(), f"impl={impl} param {i}")
        sa, sb = ref_o.state[a], got_o.state[b]
        assert sorted(sa) == sorted(sb) and sa["step"] == sb["step"]
        for key in ("exp_avg", "exp_avg_sq", "kahan_comp"):
            if key in sa:
                _close(sb[key], sa[key], f"impl={impl} param {i} {key}")
    assert ref_o.state[ref_m.ps[0]]["step"] == 19  # the tensor that sat out a step


@pytest.mark.parametrize("impl", IMPLS)
def test_clipped_lrs_agree_and_clip_on_a_spike(impl: str) -> None:
    """The functional API returns each tensor's lr_t; a spiking tensor's is below lr, the others' equal it."""

    def once(impl: str) -> list[float]:
        g = torch.Generator().manual_seed(0)
        ps = [torch.randn(s, generator=g) for s in SHAPES]
        ms, vs = [torch.zeros_like(p) for p in ps], [torch.ones_like(p) for p in ps]
        grads = [torch.randn(p.shape, generator=g) * 0.1 for p in ps]
        grads[2] = grads[2] * 1000.0
        out = stable_adamw(
            ps, grads, ms, vs, [None] * len(ps), [3] * len(ps),
            lr=0.1, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.0, impl=impl,
        )  # fmt: skip
        return [float(x) for x in out]

    ref, got = once("for_loop"), once(impl)
    assert got == pytest.approx(ref, rel=1e-6)
    assert got[2] < 0.1 and all(x == pytest.approx(0.1) for i, x in enumerate(got) if i != 2)


def test_fused_rms_does_not_depend_on_the_thread_count() -> None:
    """The per-tensor sums are per-chunk partials added in chunk order: bit-identical for 1 and 2 threads."""
    threads = torch.get_num_threads()

    def run(n: int) -> list[torch.Tensor]:
        torch.set_num_threads(n)
        try:
            g = torch.Generator().manual_seed(0)
            ps = [torch.randn(70001, generator=g).requires_grad_(), torch.randn(3, 5, generator=g).requires_grad_()]
            opt = StableAdamW(ps, lr=1e-2, impl="fused")
            for t in range(5):
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=g) * (30.0 if t == 3 else 1.0)
                opt.step()
            return [p.detach() for p in ps]
        finally:
            torch.set_num_threads(threads)

    for a, b in zip(run(1), run(2)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("dtype", "kw"),
    [(torch.float32, {}), (torch.bfloat16, {"kahan_sum": True}), (torch.float32, {"decouple_lr": True})],
    ids=["fp32", "bf16-kahan", "decouple_lr"],
)
def test_fused_state_dict_round_trip(dtype: torch.dtype, kw: dict) -> None:
    """N steps, save, load into a fresh optimizer (and model), N more == 2N straight, bit for bit."""
    n = 7

    def steps(model, opt, g, ts) -> None:
        for t in ts:
            _set_grads(model, g, t)
            opt.step()

    model = _Shapes(dtype)
    opt = StableAdamW(model.parameters(), lr=1e-2, impl="fused", **kw)
    g = torch.Generator().manual_seed(1)
    steps(model, opt, g, range(2 * n))

    first = _Shapes(dtype)
    opt1 = StableAdamW(first.parameters(), lr=1e-2, impl="fused", **kw)
    g1 = torch.Generator().manual_seed(1)
    steps(first, opt1, g1, range(n))
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt1.state_dict())
    fresh = _Shapes(dtype, seed=5)
    fresh.load_state_dict(saved_model)
    opt2 = StableAdamW(fresh.parameters(), lr=1e-2, impl="fused", **kw)
    opt2.load_state_dict(saved_opt)
    steps(fresh, opt2, g1, range(n, 2 * n))
    for a, b in zip(model.ps, fresh.ps):
        assert torch.equal(a, b)


optimi = pytest.importorskip("optimi")


@pytest.mark.parametrize("impl", StableAdamW.impls)
def test_every_impl_matches_optimi_float64(impl: str) -> None:
    """float64, two groups (one undecayed), a spike at step 12: every impl equals optimi.StableAdamW."""

    def run(make) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        ps = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in SHAPES]
        groups = [
            {"params": ps[:3], "lr": 3e-2, "weight_decay": 0.1},
            {"params": ps[3:], "lr": 1e-2, "weight_decay": 0.0},
        ]
        opt = make(groups)
        g = torch.Generator().manual_seed(1)
        for t in range(20):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64) * (50.0 if t == 12 else 1.0)
            opt.step()
        return [p.detach() for p in ps]

    ours = run(lambda groups: StableAdamW(groups, betas=(0.9, 0.99), eps=1e-6, impl=impl))
    ref = run(
        lambda groups: optimi.StableAdamW(groups, lr=1.0, betas=(0.9, 0.99), eps=1e-6, foreach=False, triton=False)
    )
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_options_are_checked_at_construction_and_in_add_param_group() -> None:
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match=r"StableAdamW\(impl='fast'\)"):
        StableAdamW(p, impl="fast")
    with pytest.raises(ValueError, match="choose one rounding"):
        StableAdamW(p, kahan_sum=True, stochastic_rounding=True)
    with pytest.raises(ValueError, match="stochastic_rounding='yes'"):
        StableAdamW(p, stochastic_rounding="yes")
    opt = StableAdamW(p)
    with pytest.raises(ValueError, match=r"impl='cuda'"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "impl": "cuda"})
    with pytest.raises(ValueError, match="needs max_lr"):
        stable_adamw(
            [], [], [], [], [], [], lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.0, decouple_lr=True
        )


def test_old_checkpoint_without_the_new_group_keys_loads() -> None:
    p = torch.nn.Parameter(torch.randn(4))
    opt = StableAdamW([p], lr=1e-2)
    p.grad = torch.randn(4)
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        for key in ("impl", "stochastic_rounding"):
            del group[key]
    fresh = StableAdamW([p], lr=1e-2)
    fresh.load_state_dict(saved)  # torch's load calls __setstate__, which back-fills the keys
    assert fresh.param_groups[0]["impl"] == "auto" and fresh.param_groups[0]["stochastic_rounding"] is False
    p.grad = torch.randn(4)
    fresh.step()
