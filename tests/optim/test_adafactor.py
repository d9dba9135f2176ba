"""Adafactor: torch's and transformers' algorithms from one class, proven in float64 against both."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from lightning_opt import build_optimizer, get_optimizer_info
from lightning_opt.optim.adafactor import TORCH_ADAFACTOR, TRANSFORMERS_ADAFACTOR, Adafactor

transformers = pytest.importorskip("transformers")

SHAPES = [(5,), (4, 6), (2, 3, 5), (1, 7), ()]
STEPS = 6


def _params(dtype: torch.dtype = torch.float64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in SHAPES]


def _run(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int = STEPS, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()
    return [p.detach().clone() for p in params]


def _assert_equal(got: list[torch.Tensor], ref: list[torch.Tensor], what: str) -> None:
    for i, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=lambda m: f"{what} param {SHAPES[i]}: {m}")


TORCH_CASES = [
    {},
    {"weight_decay": 0.1},
    {"lr": 3e-3, "weight_decay": 0.05, "maximize": True},
    {"eps": (1e-3, 1e-2), "d": 2.0, "beta2_decay": -0.5},  # eps1 large enough that its clamps act
]


@pytest.mark.parametrize("kw", TORCH_CASES, ids=str)
def test_defaults_equal_torch_adafactor_float64(kw: dict) -> None:
    ours_kw = {{"d": "clip_threshold", "beta2_decay": "decay_rate"}.get(k, k): v for k, v in kw.items()}
    ref = _run(torch.optim.Adafactor(ps := _params(), foreach=False, **kw), ps)
    got = _run(Adafactor(ps := _params(), **ours_kw), ps)
    _assert_equal(got, ref, f"torch {kw}")


HF_CASES = [
    {},
    {"weight_decay": 0.1},
    {"beta1": 0.9, "weight_decay": 0.01},
    {"warmup_init": True},
    {"relative_step": False, "lr": 1e-3},
    {"relative_step": False, "scale_parameter": False, "lr": 1e-3, "beta1": 0.5, "weight_decay": 0.1},
    {"relative_step": False, "lr": 1e-2, "clip_threshold": 0.5, "decay_rate": -0.6, "eps": (1e-3, 1e-2)},
]


@pytest.mark.parametrize("kw", HF_CASES, ids=str)
def test_transformers_settings_equal_transformers_adafactor_float64(kw: dict) -> None:
    ref = _run(transformers.Adafactor(ps := _params(), **kw), ps)
    ours = {**TRANSFORMERS_ADAFACTOR, "lr": 1e-2, **kw}  # transformers' lr=None is the 1e-2 cap
    got = _run(Adafactor(ps := _params(), **ours), ps)
    _assert_equal(got, ref, f"transformers {kw}")


def test_transformers_bf16_parameters_compute_in_float32() -> None:
    """transformers upcasts bf16 parameters and keeps float32 state; so does this class."""
    kw = {"relative_step": False, "scale_parameter": False, "lr": 1e-2, "beta1": 0.9}
    ref = _run(transformers.Adafactor(ps := _params(torch.bfloat16), **kw), ps)
    opt = Adafactor(ps := _params(torch.bfloat16), **{**TRANSFORMERS_ADAFACTOR, **kw})
    got = _run(opt, ps)
    for a, b in zip(got, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())


def _paper_fixed_beta2(params: list[torch.Tensor], beta2: float, steps: int = STEPS) -> list[torch.Tensor]:
    """The paper's Algorithms 4/5 with a fixed beta2 debiased as its eq. (section 7.1), eps1 added, rho_t = min(1e-2, 1/sqrt t)."""
    g = torch.Generator().manual_seed(1)
    out = [p.detach().clone() for p in params]
    stats: list[list[torch.Tensor]] = [[] for _ in out]
    for t in range(1, steps + 1):
        b = beta2 * (1 - beta2 ** (t - 1)) / (1 - beta2**t)
        for i, x in enumerate(out):
            grad = torch.randn(x.shape, generator=g).to(x.dtype)
            sq = grad**2 + 1e-30
            if x.ndim >= 2:
                r, c = sq.mean(-1), sq.mean(-2)
                if stats[i]:
                    r, c = b * stats[i][0] + (1 - b) * r, b * stats[i][1] + (1 - b) * c
                stats[i] = [r, c]
                v = r.unsqueeze(-1) * c.unsqueeze(-2) / r.mean(-1, keepdim=True).unsqueeze(-1)
            else:
                v = b * stats[i][0] + (1 - b) * sq if stats[i] else sq
                stats[i] = [v]
            u = grad / v.sqrt()
            u = u / max(1.0, float(u.pow(2).mean().sqrt()))
            alpha = max(1e-3, float(x.pow(2).mean().sqrt())) * min(1e-2, 1 / math.sqrt(t))
            x -= alpha * u
    return out


def test_fixed_beta2_follows_the_paper() -> None:
    ref = _paper_fixed_beta2(_params(), 0.95)
    got = _run(Adafactor(ps := _params(), beta2=0.95, eps=(1e-30, 1e-3), eps1_mode="add"), ps)
    _assert_equal(got, ref, "fixed beta2")


def test_per_group_options_equal_separate_optimizers() -> None:
    """Group 0 is transformers' Adafactor with momentum, group 1 torch's with decay: each equals its own."""
    ps = _params()
    opt = Adafactor([{"params": ps[:2], **TRANSFORMERS_ADAFACTOR, "beta1": 0.9}, {"params": ps[2:], "weight_decay": 0.1}])
    got = _run(opt, ps)
    ref = _params()
    hf_opt = transformers.Adafactor(ref[:2], beta1=0.9)
    torch_opt = torch.optim.Adafactor(ref[2:], weight_decay=0.1, foreach=False)
    g = torch.Generator().manual_seed(1)  # the same gradient draws as _run
    for _ in range(STEPS):
        for p in ref:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        hf_opt.step()
        torch_opt.step()
    _assert_equal(got, [p.detach() for p in ref], "per-group")


def test_registry_entry_keeps_torch_defaults() -> None:
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    ref_model = copy.deepcopy(model)
    ours = build_optimizer(list(model.parameters()), "adafactor", lr=1e-2, weight_decay=0.05)
    assert isinstance(ours, Adafactor)
    assert {k: ours.defaults[k] for k in TORCH_ADAFACTOR} == TORCH_ADAFACTOR
    ref = torch.optim.Adafactor(ref_model.parameters(), lr=1e-2, weight_decay=0.05, foreach=False)
    x = torch.randn(8, 6)
    for _ in range(5):
        for m, o in ((model, ours), (ref_model, ref)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b)
    assert get_optimizer_info("AdaFactorOptimizer").cls is Adafactor


def _save_load(opt: torch.optim.Optimizer) -> dict:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_state_dict_round_trip(dtype: torch.dtype) -> None:
    kw = {"beta1": 0.9, "weight_decay": 0.1}
    straight = _run(Adafactor(ps := _params(dtype), **kw), ps, steps=2 * 3)
    first = Adafactor(ps := _params(dtype), **kw)
    g = torch.Generator().manual_seed(1)

    def steps(opt: torch.optim.Optimizer, n: int) -> None:
        for _ in range(n):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
            opt.step()

    steps(first, 3)
    second = Adafactor(ps, **kw)
    second.load_state_dict(_save_load(first))
    assert all(v.dtype == torch.float32 for s in second.state.values() for k, v in s.items() if k != "step")
    steps(second, 3)
    for a, b in zip(ps, straight):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)


def test_torch_adafactor_checkpoint_loads_and_continues() -> None:
    ref_ps = _params()
    ref = torch.optim.Adafactor(ref_ps, weight_decay=0.1, d=2.0, foreach=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in ref_ps:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        ref.step()
    ours_ps = [p.detach().clone().requires_grad_() for p in ref_ps]
    ours = Adafactor(ours_ps)
    ours.load_state_dict(_save_load(ref))
    assert ours.param_groups[0]["clip_threshold"] == 2.0 and ours.param_groups[0]["weight_decay"] == 0.1
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in ref_ps]
        for ps, opt in ((ref_ps, ref), (ours_ps, ours)):
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
            opt.step()
    _assert_equal([p.detach() for p in ours_ps], [p.detach() for p in ref_ps], "resumed from torch")


def test_complex_parameters_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="adafactor does not support complex parameters"):
        Adafactor([torch.zeros(3, 2, dtype=torch.complex64, requires_grad=True)])
    opt = Adafactor([torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match="does not support complex"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.complex64, requires_grad=True)]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"warmup_init": True, "relative_step": False}, "needs relative_step=True"),
        ({"beta2": 0.99, "decay_rate": -0.5}, "give one of them"),
        ({"beta2": 1.0}, "beta2"),
        ({"beta1": -0.1}, "beta1"),
        ({"eps": (1e-30,)}, "eps"),
        ({"eps": (-1.0, 1e-3)}, "eps"),
        ({"clip_threshold": 0.0}, "clip_threshold"),
        ({"decay_rate": 0.5}, "decay_rate"),
        ({"eps1_mode": "added"}, "eps1_mode"),
        ({"weight_decay_mode": "step"}, "weight_decay_mode"),
        ({"relative_step": "false"}, "relative_step"),
        ({"impl": "fused"}, "impl"),
        ({"lr": -1.0}, "lr"),
    ],
    ids=str,
)
def test_bad_options_fail_at_construction_and_in_groups(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Adafactor([torch.zeros(3, requires_grad=True)], **kw)
    opt = Adafactor([torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], **kw})
    assert len(opt.param_groups) == 1
