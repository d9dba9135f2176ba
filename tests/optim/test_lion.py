"""Lion against lion_pytorch.Lion (same math as google/automl) in float64."""

from __future__ import annotations

import pytest
import torch

from lightning_opt.optim import build_optimizer, resolve
from lightning_opt.optim.lion import Lion, lion_update_

lion_pytorch = pytest.importorskip("lion_pytorch")

SHAPES = [(6, 5), (5,), (3, 4, 2)]


def _params(dtype: torch.dtype = torch.float64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in SHAPES]


def _run(make_opt, params: list[torch.Tensor], steps: int = 20, seed: int = 1) -> list[torch.Tensor]:
    opt = make_opt(params)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        opt.step()
    return [p.detach() for p in params]


def _groups(params: list[torch.Tensor], lr_scale: float = 1.0) -> list[dict]:
    return [
        {"params": params[:2], "lr": 3e-3 * lr_scale, "weight_decay": 0.5},
        {"params": params[2:], "lr": 1e-3 * lr_scale, "weight_decay": 0.0},
    ]


@pytest.mark.parametrize("betas", [(0.9, 0.99), (0.8, 0.95)])
def test_matches_lion_pytorch_float64(betas: tuple[float, float]) -> None:
    ours = _run(lambda ps: Lion(_groups(ps), betas=betas), _params())
    ref = _run(lambda ps: lion_pytorch.Lion(_groups(ps), betas=betas), _params())
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_weight_decay_and_betas_are_used() -> None:
    """Each option changes the trajectory (so none can be silently ignored)."""
    base = _run(lambda ps: Lion(ps, lr=1e-2), _params())
    wd = _run(lambda ps: Lion(ps, lr=1e-2, weight_decay=0.3), _params())
    betas = _run(lambda ps: Lion(ps, lr=1e-2, betas=(0.5, 0.9)), _params())
    assert not torch.equal(base[0], wd[0])
    assert not torch.equal(base[0], betas[0])


def test_functional_update_single_step() -> None:
    """First step from zero momentum: p <- p(1 - lr wd) - lr sign((1-b1) g); m <- (1-b2) g."""
    p = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    g = torch.tensor([0.3, -0.1, 0.0], dtype=torch.float64)
    m = torch.zeros_like(p)
    lion_update_(p, g, m, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.5)
    torch.testing.assert_close(p, torch.tensor([1.0 * 0.95 - 0.1, -2.0 * 0.95 + 0.1, 0.5 * 0.95], dtype=torch.float64))
    torch.testing.assert_close(m, 0.01 * g)


def test_bf16_keeps_dtype_and_state_dtype() -> None:
    p = torch.randn(4, 4, dtype=torch.bfloat16, requires_grad=True)
    opt = Lion([p], lr=1e-2)
    p.grad = torch.randn(4, 4, dtype=torch.bfloat16)
    opt.step()
    assert p.dtype == torch.bfloat16 and opt.state[p]["exp_avg"].dtype == torch.bfloat16


def test_closure_called_once_with_grad() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = Lion([p], lr=0.1)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [True] and float(loss.detach()) == 3.0
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.9))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -1.0}, "lr=-1.0"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"betas": (0.9,)}, "betas"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_rejects_invalid_hparams(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Lion([torch.zeros(2, requires_grad=True)], **kwargs)


def test_registry_names_and_aliases() -> None:
    for name in ("lion", "lion_32bit", "Lion", "LionOptimizer"):
        assert resolve(name)[0].cls is Lion
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, "LionOptimizer", lr=1e-4, weight_decay=0.1, betas=(0.95, 0.98))
    assert isinstance(opt, Lion) and opt.param_groups[0]["betas"] == (0.95, 0.98)
    with pytest.raises(TypeError, match="eps"):
        build_optimizer(model, "lion", lr=1e-4, eps=1e-8)


@pytest.mark.parametrize("bad", [{"impl": "fast"}, {"kahan_sum": "yes"}, {"kahan_sum": True, "stochastic_rounding": True}])
def test_a_group_option_is_checked_when_the_group_is_added(bad: dict) -> None:
    from lightning_opt.optim.lion import Lion

    opt = Lion([torch.zeros(2, requires_grad=True)], lr=1e-3)
    with pytest.raises(ValueError, match="is invalid"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], **bad})
    assert len(opt.param_groups) == 1
