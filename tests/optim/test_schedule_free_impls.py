"""The schedule-free implementations (for_loop, foreach, fused, triton) against each other.

``for_loop`` (:func:`schedule_free_step_` per tensor) is the reference. Every impl takes the same
operations in the same order (torch's fused multiply-adds, a correctly rounded square root), so they
agree to the last bit in practice; the comparison uses the float32 tolerance for float32 tensors
(the parameters, ``z`` and ``exp_avg_sq`` of float32 and of bf16 parameters) and the bf16 tolerance
for bf16 parameters.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_opt.optim.schedule_free import (
    AdamWScheduleFree,
    RAdamScheduleFree,
    SGDScheduleFree,
    schedule_free_adamw,
)

SHAPES = [(1,), (5,), (1025,), (7, 3), (33, 65)]
VARIANTS = {
    "adamw": (AdamWScheduleFree, {"lr": 0.02, "warmup_steps": 3}),
    "adamw-r": (AdamWScheduleFree, {"lr": 0.02, "betas": (0.95, 0.99), "r": 1.0, "weight_lr_power": 1.0}),
    "sgd": (SGDScheduleFree, {"lr": 0.3, "momentum": 0.8, "warmup_steps": 4}),
    "radam": (RAdamScheduleFree, {"lr": 0.02}),
    "radam-loud": (RAdamScheduleFree, {"lr": 0.02, "silent_sgd_phase": False}),
}
IMPLS = [impl for impl in AdamWScheduleFree.impls if impl != "for_loop"]


class _Shapes(nn.Module):
    def __init__(self, dtype: torch.dtype, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.ps = nn.ParameterList([nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES])


def _step(model: _Shapes, opt, g: torch.Generator, t: int) -> None:
    for p in model.ps:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
    if t == 3:
        model.ps[1].grad = None  # no grad this step: its y and z stay put
    opt.step()
    if t == 9:  # a validation run in the middle
        opt.eval()
        opt.train()


def _run(variant: str, impl: str, dtype: torch.dtype, wd: float, steps: int = 20, **extra):
    cls, kw = VARIANTS[variant]
    model = _Shapes(dtype)
    opt = cls(model.parameters(), weight_decay=wd, impl=impl, **kw, **extra)
    g = torch.Generator().manual_seed(1)
    for t in range(steps):
        _step(model, opt, g, t)
    return model, opt


def _close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.dtype == ref.dtype, what
    if ref.dtype == torch.bfloat16:
        step = torch.finfo(torch.bfloat16).eps * float(ref.abs().max())
        torch.testing.assert_close(got, ref, rtol=1.6e-2, atol=max(step, 1e-5), msg=lambda m: f"{what}: {m}")
    else:
        torch.testing.assert_close(got, ref, msg=lambda m: f"{what}: {m}")


# stochastic rounding only changes bf16 parameters
DTYPE_SR = [
    pytest.param(torch.float32, False, id="fp32"),
    pytest.param(torch.bfloat16, False, id="bf16"),
    pytest.param(torch.bfloat16, True, id="bf16-stochastic"),
]


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize(("dtype", "sr"), DTYPE_SR)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("impl", IMPLS)
def test_impl_equals_for_loop(impl: str, variant: str, dtype: torch.dtype, sr: bool, wd: float) -> None:
    ref_m, ref_o = _run(variant, "for_loop", dtype, wd, stochastic_rounding=sr)
    got_m, got_o = _run(variant, impl, dtype, wd, stochastic_rounding=sr)
    for i, (a, b) in enumerate(zip(ref_m.ps, got_m.ps)):
        _close(b.detach(), a.detach(), f"{variant} impl={impl} param {i}")
        sa, sb = ref_o.state[a], got_o.state[b]
        assert sorted(sa) == sorted(sb)
        for key, value in sa.items():
            assert value.dtype == (torch.float32 if dtype is torch.bfloat16 else dtype)
            _close(sb[key], value, f"{variant} impl={impl} param {i} {key}")
    for ga, gb in zip(ref_o.param_groups, got_o.param_groups):
        for key in ("k", "weight_sum", "lr_max", "train_mode", "scheduled_lr"):
            assert ga[key] == gb[key], key


def test_stochastic_rounding_is_used() -> None:
    """bf16 parameters: the stochastically rounded run differs from the nearest one (the option is honoured)."""
    for impl in AdamWScheduleFree.impls:
        nearest, _ = _run("adamw", impl, torch.bfloat16, 0.0)
        stochastic, _ = _run("adamw", impl, torch.bfloat16, 0.0, stochastic_rounding=True)
        assert not torch.equal(nearest.ps[4], stochastic.ps[4]), impl


@pytest.mark.parametrize("impl", AdamWScheduleFree.impls)
@pytest.mark.parametrize("cls", [AdamWScheduleFree, SGDScheduleFree, RAdamScheduleFree])
def test_gradient_is_not_modified_in_place(cls, impl: str) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.randn(37).to(dtype).requires_grad_()
        opt = cls([p], weight_decay=0.1, impl=impl, **({"silent_sgd_phase": False} if cls is RAdamScheduleFree else {}))
        g = torch.randn(37).to(dtype)
        p.grad = g.clone()
        opt.step()
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize(
    ("variant", "dtype"),
    [("adamw", torch.float32), ("adamw", torch.bfloat16), ("sgd", torch.float32), ("radam", torch.float32)],
)
def test_fused_state_dict_round_trip_across_an_eval_save(variant: str, dtype: torch.dtype) -> None:
    """N steps, eval(), save (the x weights and the state), load into a fresh model and optimizer,
    train(), N more steps == 2N straight (with the same eval/train at N), bit for bit."""
    cls, kw = VARIANTS[variant]
    n = 8

    def make(model):
        return cls(model.parameters(), weight_decay=0.05, impl="fused", **kw)

    def steps(model, opt, g, ts) -> None:
        for t in ts:
            for p in model.ps:
                p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
            opt.step()

    straight = _Shapes(dtype)
    opt = make(straight)
    g = torch.Generator().manual_seed(1)
    steps(straight, opt, g, range(n))
    opt.eval()
    opt.train()
    steps(straight, opt, g, range(n, 2 * n))

    first = _Shapes(dtype)
    opt1 = make(first)
    g1 = torch.Generator().manual_seed(1)
    steps(first, opt1, g1, range(n))
    opt1.eval()
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt1.state_dict())
    fresh = _Shapes(dtype, seed=7)
    fresh.load_state_dict(saved_model)
    opt2 = make(fresh)
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups[0]["k"] == n and not opt2.train_mode
    opt2.train()
    steps(fresh, opt2, g1, range(n, 2 * n))
    for a, b in zip(straight.ps, fresh.ps):
        assert torch.equal(a, b)
    for a, b in zip(straight.ps, fresh.ps):
        for key, value in opt.state[a].items():
            assert torch.equal(value, opt2.state[b][key]) and opt2.state[b][key].dtype == value.dtype


def test_functional_api_equals_the_class() -> None:
    """schedule_free_adamw over lists, with the class's k/lr/c, takes the class's step."""
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [torch.randn(s, generator=g) for s in SHAPES]
    model = _Shapes(torch.float32)
    with torch.no_grad():
        for p, q in zip(model.ps, ps):
            p.copy_(q)
    opt = AdamWScheduleFree(model.parameters(), lr=0.01, weight_decay=0.1)
    for p, gr in zip(model.ps, grads):
        p.grad = gr.clone()
    opt.step()  # step 1: c = 1, lr = 0.01
    zs = [p.clone() for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    schedule_free_adamw(ps, grads, zs, vs, lr=0.01, beta=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, c=1.0, step=1)
    for p, q in zip(model.ps, ps):
        assert torch.equal(p.detach(), q)
    for p, z, v in zip(model.ps, zs, vs):
        assert torch.equal(opt.state[p]["z"], z) and torch.equal(opt.state[p]["exp_avg_sq"], v)


def test_options_are_checked_at_construction_and_in_add_param_group() -> None:
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match=r"SGDScheduleFree\(impl='fast'\)"):
        SGDScheduleFree(p, impl="fast")
    with pytest.raises(ValueError, match=r"RAdamScheduleFree\(stochastic_rounding=1\)"):
        RAdamScheduleFree(p, stochastic_rounding=1)
    opt = AdamWScheduleFree(p)
    with pytest.raises(ValueError, match=r"AdamWScheduleFree\(impl='gpu'\)"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "impl": "gpu"})
    with pytest.raises(TypeError):
        AdamWScheduleFree(p, kahan_sum=True)  # z is a float32 master copy: no Kahan option


def test_old_checkpoint_without_the_new_group_keys_loads() -> None:
    p = torch.nn.Parameter(torch.randn(4))
    opt = AdamWScheduleFree([p], lr=1e-2)
    p.grad = torch.randn(4)
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["impl"], group["stochastic_rounding"]
    fresh = AdamWScheduleFree([p], lr=1e-2)
    fresh.load_state_dict(saved)  # torch's load calls __setstate__, which back-fills the keys
    assert fresh.param_groups[0]["impl"] == "auto" and fresh.param_groups[0]["stochastic_rounding"] is False
    p.grad = torch.randn(4)
    fresh.step()
