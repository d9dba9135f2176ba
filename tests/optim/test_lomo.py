"""LOMO against the authors' ``lomo_optim.Lomo`` (lomo-optim 0.1.1) and a float64 recurrence.

The reference runs on CPU as is (its ``DynamicLossScaler`` asks ``torch.distributed.get_rank()`` for
its overflow message, patched to 0 here). Its norm clipping is ``grad_norm(loss)`` then
``fused_backward(loss, lr)``; ours is one ``fused_backward(loss)`` (or ``step()``). The float64
comparison is against a hand recurrence written from the paper's update (SGD with global-norm
clipping, value clipping and decoupled-by-lr weight decay)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_opt import build_optimizer, get_optimizer_info
from lightning_opt.optim.lomo import Lomo
from lightning_opt.optim.registry import resolve
from tests.optim.test_adalomo import SHAPES, _grads, _linear_loss, _Params, fit_manual_fused, one_step

STEPS = 12
HP = {"lr": 3e-2, "weight_decay": 0.2}


@pytest.fixture
def reference(monkeypatch: pytest.MonkeyPatch):
    lomo_optim = pytest.importorskip("lomo_optim")
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 0)
    return lomo_optim.Lomo


@pytest.mark.parametrize("mode", ["step", "fused_backward"])
@pytest.mark.parametrize("clip", [{}, {"clip_grad_norm": 2.0}, {"clip_grad_norm": 5.0, "clip_grad_value": 0.5}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(reference, dtype: torch.dtype, clip: dict, mode: str) -> None:
    grads = _grads(steps=STEPS)  # magnitudes 0.1, 1, 10: clipping triggers on some steps only
    ref_model, our_model = _Params(dtype), _Params(dtype)
    ref = reference(ref_model, **HP, **clip)
    ours = Lomo(our_model.parameters(), **HP, **clip)
    for step_grads in grads:
        if "clip_grad_norm" in clip:
            ref.grad_norm(_linear_loss(ref_model, step_grads))
        ref.fused_backward(_linear_loss(ref_model, step_grads), HP["lr"])
        one_step(our_model, ours, step_grads, mode)
    for (n, a), b in zip(our_model.named_parameters(), ref_model.parameters()):
        # the global norm sums the per-tensor norms in hook order here and in name order there
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")


def test_fp16_dynamic_loss_scaling_matches_reference(reference) -> None:
    # scale 2**13: gradients of magnitude 10 overflow float16 (65504) at first, then the scale halves
    scaling = {"clip_grad_norm": 4.0, "loss_scale_args": {"init_scale": 2.0**13}}
    grads = _grads(steps=STEPS)
    ref_model, our_model = _Params(torch.float16), _Params(torch.float16)
    ref = reference(ref_model, **HP, **scaling)
    ours = Lomo(our_model.parameters(), **HP, clip_grad_norm=4.0, init_scale=2.0**13)
    stepped = []
    for step_grads in grads:
        ref.grad_norm(_linear_loss(ref_model, step_grads))
        ref.fused_backward(_linear_loss(ref_model, step_grads), HP["lr"])
        stepped.append(ours.fused_backward(_linear_loss(our_model, step_grads)))
        assert ours.loss_scaler["scale"] == ref.loss_scaler.loss_scale
    assert ours.loss_scaler["enabled"] is True  # turned on by the float16 loss, as the reference
    assert 0 < stepped.count(False) < STEPS - 2, stepped  # some steps skipped on overflow, most taken
    for (n, a), b in zip(our_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_loss_scale_grows_after_a_window_and_raises_at_the_minimum() -> None:
    model = _Params()
    opt = Lomo(model.parameters(), lr=1e-3, loss_scaling=True, init_scale=8.0, scale_window=2, min_scale=2.0)
    grads = _grads(steps=1)[0]
    for _ in range(2):
        assert opt.fused_backward(_linear_loss(model, grads))
    assert opt.loss_scaler == {"enabled": True, "scale": 16.0, "clean_steps": 0}
    bad = {k: torch.full_like(v, math.inf) for k, v in grads.items()}
    before = [p.detach().clone() for p in model.parameters()]
    for expected in (8.0, 4.0, 2.0):
        assert not opt.fused_backward(_linear_loss(model, bad))
        assert opt.loss_scaler["scale"] == expected
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="minimum loss scale 2"):
        opt.fused_backward(_linear_loss(model, bad))


def _hand_recurrence(params, grads, *, lr, weight_decay, clip_grad_norm=None, clip_grad_value=None):
    p = {k: v.clone() for k, v in params.items()}
    for step_grads in grads:
        coef = 1.0
        if clip_grad_norm is not None:
            total = math.sqrt(sum(float((g * g).sum()) for g in step_grads.values()))
            coef = min(1.0, clip_grad_norm / (total + 1e-6))
        for k, g in step_grads.items():
            if clip_grad_value is not None:
                g = g.clamp(-clip_grad_value, clip_grad_value)
            p[k] = p[k] * (1 - lr * weight_decay) - lr * coef * g
    return p


@pytest.mark.parametrize("mode", ["step", "fused_backward"])
def test_matches_paper_recurrence_float64(mode: str) -> None:
    shapes = {**SHAPES, "conv": (2, 3, 4)}
    hp = {**HP, "clip_grad_norm": 3.0, "clip_grad_value": 0.8}
    grads = _grads(shapes, steps=STEPS)
    model = _Params(torch.float64, shapes)
    expected = _hand_recurrence({n: p.detach() for n, p in model.named_parameters()}, grads, **hp)
    opt = Lomo(model.parameters(), **hp)
    for step_grads in grads:
        one_step(model, opt, step_grads, mode)
    assert opt.state_dict()["state"] == {}  # LOMO keeps no optimizer state
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-12, atol=1e-14, msg=lambda m, n=n: f"{n}: {m}")


def test_param_groups_and_fused_equals_step() -> None:
    grads = _grads(steps=4)
    models = {mode: _Params() for mode in ("step", "fused_backward")}
    for mode, model in models.items():
        groups = [
            {"params": [model.w], "lr": 1e-2, "clip_grad_value": 0.3},
            {"params": [model.v, model.b], "weight_decay": 0.5},
        ]
        opt = Lomo(groups, lr=2e-2, clip_grad_norm=1.5)
        for step_grads in grads:
            one_step(model, opt, step_grads, mode)
    for a, b in zip(models["step"].parameters(), models["fused_backward"].parameters()):
        assert torch.equal(a, b)


def test_fused_round_trip_with_loss_scaler() -> None:
    """N fused steps + state_dict + load into a fresh optimizer + N steps == 2N steps (scale included)."""
    n, grads = 3, _grads(steps=6)
    kw = {**HP, "clip_grad_norm": 1.0, "loss_scaling": True, "init_scale": 2.0**4, "scale_window": 2}
    straight = _Params()
    opt = Lomo(straight.parameters(), **kw)
    for g in grads:
        opt.fused_backward(_linear_loss(straight, g))
    first = _Params()
    opt1 = Lomo(first.parameters(), **kw)
    for g in grads[:n]:
        opt1.fused_backward(_linear_loss(first, g))
    saved = copy.deepcopy(opt1.state_dict())
    assert saved["loss_scaler"] == {"enabled": True, "scale": 32.0, "clean_steps": 1}
    resumed = _Params()
    resumed.load_state_dict(first.state_dict())
    opt2 = Lomo(resumed.parameters(), **kw)
    opt2.load_state_dict(saved)
    for g in grads[n:]:
        opt2.fused_backward(_linear_loss(resumed, g))
    assert opt2.loss_scaler == opt.loss_scaler
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_fused_backward_holds_one_gradient_at_a_time(clip) -> None:
    model = _Params()
    alive: list[int] = []

    def count(*args, **kwargs) -> None:
        alive.append(sum(p.grad is not None for p in model.parameters()))

    opt = Lomo(model.parameters(), clip_grad_norm=clip)
    for p in model.parameters():  # before the optimizer's own hook (added by fused_backward): sees the fresh gradient
        p.register_post_accumulate_grad_hook(count)
    opt.fused_backward(_linear_loss(model, _grads(steps=1)[0]))
    passes = 1 if clip is None else 2  # the norm pass, then the update pass
    assert alive == [1] * (passes * len(SHAPES))


def test_deepcopy_keeps_the_optimizer_wide_options() -> None:
    model = _Params()
    opt = Lomo(model.parameters(), clip_grad_norm=0.5, loss_scaling=True, init_scale=64.0, scale_window=3)
    opt.fused_backward(_linear_loss(model, _grads(steps=1)[0]))
    twin = copy.deepcopy(opt)
    assert (twin.clip_grad_norm, twin.loss_scaling, twin.loss_scaler) == (0.5, True, opt.loss_scaler)
    assert twin._scaling_options == opt._scaling_options and twin._hooked == []


def test_step_refuses_forced_loss_scaling_and_fused_refuses_accumulation() -> None:
    model = _Params()
    with pytest.raises(RuntimeError, match="GradScaler"):
        Lomo(model.parameters(), loss_scaling=True).step()
    opt = Lomo(model.parameters())
    _linear_loss(model, _grads(steps=1)[0]).backward()
    with pytest.raises(RuntimeError, match=r"Lomo.fused_backward: .*cannot accumulate"):
        opt.fused_backward(_linear_loss(model, _grads(steps=1)[0]))


def test_lightning_manual_optimization_with_fused_backward_and_clipping() -> None:
    module, _, before, data = fit_manual_fused("lomo", lr=1e-2, clip_grad_norm=1.0)
    expected = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    for p, b in zip(expected.parameters(), before):
        p.data.copy_(b)
    ref = Lomo(expected.parameters(), lr=1e-2, clip_grad_norm=1.0)
    for xb, yb in data:  # the same four steps by hand, with backward() + step()
        nn.functional.mse_loss(expected(xb), yb).backward()
        ref.step()
        ref.zero_grad(set_to_none=True)
    for a, b in zip(module.net.parameters(), expected.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -1.0}, "lr"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"clip_grad_norm": 0.0}, "clip_grad_norm"),
        ({"clip_grad_value": -1.0}, "clip_grad_value"),
        ({"loss_scaling": "yes"}, "loss_scaling"),
        ({"init_scale": 0.0}, "init_scale"),
        ({"scale_factor": 1.0}, "scale_factor"),
        ({"scale_window": 0}, "scale_window"),
        ({"min_scale": 2.0**40}, "min_scale"),
        ({"impl": "foreach"}, "impl"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=rf"Lomo\({match}="):
        Lomo([nn.Parameter(torch.zeros(2))], **kwargs)
    opt = Lomo([nn.Parameter(torch.zeros(2))])
    if match in ("lr", "weight_decay", "clip_grad_value", "impl"):
        with pytest.raises(ValueError, match=rf"Lomo\({match}="):
            opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))], **kwargs})
        assert len(opt.param_groups) == 1


def test_registered_with_the_huggingface_name() -> None:
    assert get_optimizer_info("lomo").cls is Lomo
    info, fixed = resolve("LOMO")  # TrainingArguments(optim="lomo"), case-insensitive
    assert (info.cls, dict(fixed)) == (Lomo, {})
    opt = build_optimizer(nn.Linear(2, 2), "lomo", lr=1e-3, clip_grad_norm=1.0)
    assert isinstance(opt, Lomo) and opt.clip_grad_norm == 1.0


def test_fused_backward_refuses_more_than_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_opt.optim.adalomo import AdaLomo

    model = _Params()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 2)
    for opt in (Lomo(model.parameters()), AdaLomo(model.parameters())):
        with pytest.raises(RuntimeError, match=r"fused_backward runs in a single process only \(world size here: 2\)"):
            opt.fused_backward(_linear_loss(model, _grads(steps=1)[0]))
