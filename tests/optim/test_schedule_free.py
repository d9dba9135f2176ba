"""Schedule-free AdamW/SGD/RAdam against the ``schedulefree`` package (1.4.1), float64, 20 steps.

The tests without an explicit ``impl`` run the default (``"auto"``: the fused kernel on the CPU).
"""

from __future__ import annotations

import copy

import pytest
import torch

schedulefree = pytest.importorskip("schedulefree")

from lightning_opt import build_optimizer, get_optimizer_info
from lightning_opt.optim.schedule_free import (
    AdamWScheduleFree,
    RAdamScheduleFree,
    SGDScheduleFree,
    average_weight,
    radam_rectification,
)

ADAMW_KW = [
    {},
    {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-3, "weight_decay": 0.1},
    {"lr": 0.01, "warmup_steps": 7},
    {"lr": 0.01, "r": 1.0},
    {"lr": 0.01, "weight_lr_power": 0.5, "warmup_steps": 5},
]
SGD_KW = [
    {"lr": 0.1},
    {"lr": 0.1, "momentum": 0.7, "weight_decay": 0.1},
    {"lr": 0.1, "warmup_steps": 6, "r": 0.5},
    {"lr": 0.1, "warmup_steps": 6, "weight_lr_power": 1.0},
]
RADAM_KW = [
    {"lr": 0.01},
    {"lr": 0.01, "silent_sgd_phase": False, "betas": (0.85, 0.99)},
    {"lr": 0.01, "weight_decay": 0.2, "eps": 1e-4, "r": 1.0, "weight_lr_power": 1.0},
]

CASES = (
    [(AdamWScheduleFree, schedulefree.AdamWScheduleFree, kw) for kw in ADAMW_KW]
    + [(AdamWScheduleFree, schedulefree.AdamWScheduleFreeReference, kw) for kw in ADAMW_KW[:3]]
    + [(SGDScheduleFree, schedulefree.SGDScheduleFree, kw) for kw in SGD_KW]
    + [(SGDScheduleFree, schedulefree.SGDScheduleFreeReference, kw) for kw in SGD_KW[:2]]
    + [(RAdamScheduleFree, schedulefree.RAdamScheduleFree, kw) for kw in RADAM_KW]
)


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)]


def _groups(params: list[torch.Tensor]) -> list[dict]:
    # two groups: the second with its own lr and no decay, so per-group hyperparameters matter
    return [{"params": [params[0]]}, {"params": [params[1]], "lr": 0.003, "weight_decay": 0.0}]


@pytest.mark.parametrize("impl", AdamWScheduleFree.impls)
@pytest.mark.parametrize(("ours", "ref", "kw"), CASES, ids=lambda v: getattr(v, "__name__", None) or str(v))
def test_matches_schedulefree_with_eval_switches(ours, ref, kw, impl) -> None:
    """Every impl (the default on the CPU is the fused kernel) against the package, float64, 20 steps."""
    pa = [p.clone().requires_grad_() for p in _params()]
    pb = [p.clone().requires_grad_() for p in _params()]
    oa, ob = ours(_groups(pa), impl=impl, **kw), ref(_groups(pb), **kw)
    ob.train()  # schedulefree starts in eval mode; ours starts in train mode
    g = torch.Generator().manual_seed(1)
    for t in range(20):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in pa]
        for i, (a, b, gr) in enumerate(zip(pa, pb, grads)):
            # the bias sits out step 3 (grad None): no state change for it there
            a.grad = None if (i == 1 and t == 3) else gr.clone()
            b.grad = None if (i == 1 and t == 3) else gr.clone()
        oa.step()
        ob.step()
        if t in (4, 11, 19):
            oa.eval()
            ob.eval()
            for a, b in zip(pa, pb):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)  # the averaged x
            if t != 19:
                oa.train()
                ob.train()
        for a, b in zip(pa, pb):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for ga, gb in zip(oa.param_groups, ob.param_groups):
        for key in ("k", "weight_sum", "lr_max", "train_mode"):
            assert ga[key] == pytest.approx(gb[key], rel=1e-12), key


def test_starts_in_train_mode_and_refuses_to_step_in_eval() -> None:
    p = torch.zeros(3, requires_grad=True)
    opt = AdamWScheduleFree([p])
    assert opt.train_mode and opt.param_groups[0]["train_mode"] is True
    p.grad = torch.ones(3)
    opt.step()
    opt.eval()
    assert not opt.train_mode
    with pytest.raises(RuntimeError, match=r"AdamWScheduleFree.step\(\) called in eval mode.*optimizer.train\(\)"):
        opt.step()


def test_eval_gives_the_reference_average_x() -> None:
    # AdamWScheduleFreeReference stores x explicitly; our x is implicit in (y, z)
    pa, pb = torch.randn(5, dtype=torch.float64, requires_grad=True), None
    pb = pa.detach().clone().requires_grad_()
    oa = AdamWScheduleFree([pa], lr=0.05, warmup_steps=3)
    ob = schedulefree.AdamWScheduleFreeReference([pb], lr=0.05, warmup_steps=3)
    ob.train()
    for _ in range(10):
        g = torch.randn(5, dtype=torch.float64)
        pa.grad, pb.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    oa.eval()
    torch.testing.assert_close(pa.detach(), ob.state[pb]["x"], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(pa.detach(), ob.state[pb]["y"])  # x differs from y


def test_gradient_is_not_modified_in_place() -> None:
    p = torch.randn(4, requires_grad=True)
    for opt in (
        AdamWScheduleFree([p], weight_decay=0.1),
        SGDScheduleFree([p], weight_decay=0.1),
        RAdamScheduleFree([p], weight_decay=0.1),
    ):
        g = torch.randn(4)
        p.grad = g.clone()
        opt.step()
        assert torch.equal(p.grad, g)


def test_state_dict_round_trip_across_an_eval_save() -> None:
    # save in eval mode (as ScheduleFreeMode does), load into a fresh optimizer, train(), continue
    def run(split: bool) -> torch.Tensor:
        torch.manual_seed(0)
        p = torch.randn(8, dtype=torch.float64, requires_grad=True)
        opt = AdamWScheduleFree([p], lr=0.02, warmup_steps=4, weight_decay=0.05)
        g = torch.Generator().manual_seed(3)
        for t in range(12):
            if t == 6:
                opt.eval()
                if split:
                    saved_p, saved = p.detach().clone(), copy.deepcopy(opt.state_dict())
                    p = saved_p.clone().requires_grad_()
                    opt = AdamWScheduleFree([p], lr=0.02, warmup_steps=4, weight_decay=0.05)
                    opt.load_state_dict(saved)
                    assert opt.param_groups[0]["k"] == 6 and opt.param_groups[0]["train_mode"] is False
                opt.train()
            p.grad = torch.randn(8, generator=g, dtype=torch.float64)
            opt.step()
        return p.detach()

    assert torch.equal(run(False), run(True))


def test_bf16_params_keep_fp32_state_after_load() -> None:
    p = torch.randn(16).to(torch.bfloat16).requires_grad_()
    opt = AdamWScheduleFree([p], lr=0.01)
    p.grad = torch.randn(16).to(torch.bfloat16)
    opt.step()
    assert p.dtype == torch.bfloat16
    assert opt.state[p]["z"].dtype == torch.float32 and opt.state[p]["exp_avg_sq"].dtype == torch.float32
    saved = opt.state_dict()
    fresh = AdamWScheduleFree([p], lr=0.01)
    fresh.load_state_dict(saved)  # torch casts to bf16; the post hook restores float32
    assert fresh.state[p]["z"].dtype == torch.float32
    fresh.eval()
    fresh.train()
    assert p.dtype == torch.bfloat16


def test_weighting_and_rectification_functions() -> None:
    c, lr_max, ws = average_weight(0, 0.5, -1.0, 0.0, r=0.0, weight_lr_power=2.0)
    assert (c, lr_max, ws) == (1.0, 0.5, 0.25)
    c, lr_max, ws = average_weight(1, 0.25, lr_max, ws, r=1.0, weight_lr_power=2.0)  # lr_max stays 0.5
    assert lr_max == 0.5 and ws == pytest.approx(0.25 + 2 * 0.25) and c == pytest.approx(0.5 / 0.75)
    assert average_weight(0, 0.0, -1.0, 0.0, r=0.0, weight_lr_power=2.0)[0] == 0.0  # lr 0: no averaging
    assert radam_rectification(1, 0.999) is None and radam_rectification(4, 0.999) is None
    assert 0 < radam_rectification(5, 0.999) < 1


@pytest.mark.parametrize(
    ("cls", "kw", "match"),
    [
        (AdamWScheduleFree, {"lr": -1.0}, r"AdamWScheduleFree\(lr=-1.0\)"),
        (AdamWScheduleFree, {"betas": (0.0, 0.999)}, r"betas\[0\]=0.0.*\(0, 1\)"),
        (AdamWScheduleFree, {"betas": (0.9, 1.0)}, r"beta2 must lie in \[0, 1\)"),
        (AdamWScheduleFree, {"warmup_steps": 2.5}, r"warmup_steps=2.5.*integer"),
        (AdamWScheduleFree, {"eps": float("nan")}, r"eps=nan"),
        (SGDScheduleFree, {"momentum": 1.0}, r"SGDScheduleFree\(momentum=1.0\)"),
        (SGDScheduleFree, {"weight_lr_power": -2}, r"weight_lr_power=-2"),
        (RAdamScheduleFree, {"silent_sgd_phase": "yes"}, r"silent_sgd_phase='yes'"),
        (RAdamScheduleFree, {"r": -1.0}, r"RAdamScheduleFree\(r=-1.0\)"),
    ],
)
def test_rejects_invalid_hyperparameters(cls, kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        cls([torch.zeros(2, requires_grad=True)], **kw)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("schedule_free_adamw", AdamWScheduleFree),
        ("schedule_free_sgd", SGDScheduleFree),
        ("schedule_free_radam", RAdamScheduleFree),
    ],
)
def test_registry_entries(name, cls) -> None:
    from lightning_opt.callbacks import ScheduleFreeMode
    from lightning_opt.optim.registry import make_callbacks

    info = get_optimizer_info(name)
    assert info.cls is cls and info.schedule_free
    assert [type(cb) for cb in make_callbacks(info)] == [ScheduleFreeMode]
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, name, lr=0.01, weight_decay=0.1)
    assert isinstance(opt, cls)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]  # bias undecayed
