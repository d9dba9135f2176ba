"""LAMB and LARS against pytorch_optimizer (matching options), torch SGD and float64 recurrences."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_opt.optim import build_optimizer, resolve
from lightning_opt.optim.lamb_lars import Lamb, Lars

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")

SHAPES = [(6, 5), (4, 3), (5,), (3,)]  # two matrices, two vectors


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # norms well below pytorch_optimizer.Lamb's clamp of ||p|| at 10
    return [(0.5 * torch.randn(s, generator=g, dtype=torch.float64)).requires_grad_() for s in SHAPES]


def _grads(steps: int, seed: int = 1, scale: float = 1.0) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[scale * torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES] for _ in range(steps)]


def _run(make_opt, params, grads) -> list[torch.Tensor]:
    opt = make_opt(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params]


def _groups(ps, wd=0.1):
    return [{"params": ps[:2], "lr": 2e-2, "weight_decay": wd}, {"params": ps[2:], "lr": 1e-2, "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------------- LAMB


@pytest.mark.parametrize("grad_averaging", [True, False])
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.8, 0.95)])
def test_lamb_matches_pytorch_optimizer(grad_averaging: bool, betas) -> None:
    """pytorch_optimizer's Lamb == ours with no bias correction and every tensor adapted.

    It adds eps to ||u|| in the trust ratio (we do not); eps=1e-12 keeps that term below 1e-11.
    """
    grads = _grads(20)
    kw = {"betas": betas, "eps": 1e-12, "grad_averaging": grad_averaging}
    ours = _run(
        lambda ps: Lamb(_groups(ps), bias_correction=False, always_adapt=True, max_grad_norm=0.0, **kw),
        _params(),
        grads,
    )
    ref = _run(
        lambda ps: pytorch_optimizer.Lamb(
            _groups(ps), adam_debias=True, weight_decouple=False, pre_norm=False, foreach=False, **kw
        ),
        _params(),
        grads,
    )
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _nvlamb_reference(groups, grads, *, betas, eps, max_grad_norm, trust_clip=False, always_adapt=False):
    """A plain float64 recurrence of apex/timm NVLAMB, written from the equations."""
    b1, b2 = betas
    ps = [[p.detach().clone() for p in g["params"]] for g in groups]
    ms = [[torch.zeros_like(p) for p in g] for g in ps]
    vs = [[torch.zeros_like(p) for p in g] for g in ps]
    flat_index = 0
    for t, step_grads in enumerate(grads, start=1):
        total = math.sqrt(sum(float((g**2).sum()) for g in step_grads))
        clip = max(1.0, total / max_grad_norm) if max_grad_norm > 0 else 1.0
        flat_index = 0
        for gi, group in enumerate(groups):
            for j in range(len(ps[gi])):
                g = step_grads[flat_index] / clip
                flat_index += 1
                ms[gi][j] = b1 * ms[gi][j] + (1 - b1) * g
                vs[gi][j] = b2 * vs[gi][j] + (1 - b2) * g * g
                u = (ms[gi][j] / (1 - b1**t)) / (torch.sqrt(vs[gi][j] / (1 - b2**t)) + eps)
                u = u + group["weight_decay"] * ps[gi][j]
                if group["weight_decay"] != 0 or always_adapt:
                    wn, un = float(ps[gi][j].norm()), float(u.norm())
                    r = wn / un if wn > 0 and un > 0 else 1.0
                    if trust_clip:
                        r = min(r, 1.0)
                    u = r * u
                ps[gi][j] = ps[gi][j] - group["lr"] * u
    return [p for g in ps for p in g]


@pytest.mark.parametrize(
    "kw",
    [
        {},  # defaults: bias correction, clip at 1.0 (engaged: grads are large), adapt wd != 0 groups
        {"trust_clip": True, "max_grad_norm": 0.0},
        {"always_adapt": True, "max_grad_norm": 50.0, "betas": (0.8, 0.9), "eps": 1e-3},
    ],
)
def test_lamb_matches_nvlamb_recurrence(kw) -> None:
    grads = _grads(20, scale=3.0)
    opts = {"betas": (0.9, 0.999), "eps": 1e-6, "max_grad_norm": 1.0, **kw}
    ours = _run(lambda ps: Lamb(_groups(ps), **opts), _params(), grads)
    ref = _nvlamb_reference(_groups(_params()), grads, **opts)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_lamb_options_change_the_result_and_leave_grad_alone() -> None:
    grads = _grads(5, scale=3.0)
    base = _run(lambda ps: Lamb(_groups(ps)), _params(), grads)
    for kw in (
        {"bias_correction": False},
        {"max_grad_norm": 0.0},
        {"trust_clip": True},
        {"always_adapt": True},
        {"grad_averaging": False},
    ):
        other = _run(lambda ps, kw=kw: Lamb(_groups(ps), **kw), _params(), grads)
        assert not all(torch.allclose(a, b) for a, b in zip(base, other)), f"{kw} had no effect"
    ps = _params()
    opt = Lamb(ps)
    for p, g in zip(ps, grads[0]):
        p.grad = g.clone()
    opt.step()
    for p, g in zip(ps, grads[0]):
        assert torch.equal(p.grad, g), "the global clip must not write into p.grad"


# ------------------------------------------------------------------------------------------- LARS


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_matches_pytorch_optimizer(nesterov: bool) -> None:
    """Matrices in a decayed (adapted) group, vectors in a wd=0 group; eps=0 as theirs has none."""
    grads = _grads(20)
    ours = _run(
        lambda ps: Lars(_groups(ps, wd=0.05), momentum=0.9, nesterov=nesterov, eps=0.0, trust_coeff=0.02),
        _params(),
        grads,
    )
    ref = _run(
        lambda ps: pytorch_optimizer.LARS(
            _groups(ps, wd=0.05), momentum=0.9, nesterov=nesterov, trust_coefficient=0.02, foreach=False
        ),
        _params(),
        grads,
    )
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "kw",
    [{"momentum": 0.9}, {"momentum": 0.8, "dampening": 0.3}, {"momentum": 0.9, "nesterov": True}, {"momentum": 0.0}],
)
def test_lars_without_adaptation_is_torch_sgd(kw) -> None:
    grads = _grads(20)
    with pytest.warns(UserWarning, match="plain SGD"):
        ours = _run(lambda ps: Lars(_groups(ps, wd=0.0), **kw), _params(), grads)
    ref = _run(lambda ps: torch.optim.SGD(_groups(ps, wd=0.0), **kw), _params(), grads)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def _lars_reference(p, grads, *, lr, momentum, wd, coeff, eps, trust_clip):
    p = p.detach().clone()
    buf = None
    for g in grads:
        wn, gn = float(p.norm()), float(g.norm())
        r = coeff * wn / (gn + wd * wn + eps) if wn > 0 and gn > 0 else 1.0
        if trust_clip:
            r = min(r / lr, 1.0)
        d = (g + wd * p) * r
        buf = d.clone() if buf is None else momentum * buf + d
        p = p - lr * buf
    return p


@pytest.mark.parametrize("trust_clip, lr", [(False, 0.5), (True, 0.5), (True, 1e-4)])
def test_lars_trust_ratio_eps_and_larc_clip(trust_clip: bool, lr: float) -> None:
    g = torch.Generator().manual_seed(4)
    grads = [torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(20)]
    p0 = torch.randn(5, 4, generator=g, dtype=torch.float64)
    # always_adapt with wd=0 adapts too; eps large enough to matter
    for wd, always in ((0.01, False), (0.0, True)):
        p = p0.clone().requires_grad_()
        ours = _run(
            lambda ps, wd=wd, always=always: Lars(
                ps,
                lr=lr,
                momentum=0.9,
                weight_decay=wd,
                trust_coeff=0.01,
                eps=0.5,
                trust_clip=trust_clip,
                always_adapt=always,
            ),
            [p],
            [[x] for x in grads],
        )[0]
        ref = _lars_reference(p0, grads, lr=lr, momentum=0.9, wd=wd, coeff=0.01, eps=0.5, trust_clip=trust_clip)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_warns_when_nothing_is_adapted() -> None:
    import warnings

    with pytest.warns(UserWarning, match="plain Adam"):
        Lamb([torch.zeros(2, requires_grad=True)], weight_decay=0.0)
    with pytest.warns(UserWarning, match="plain SGD"):
        Lars([torch.zeros(2, requires_grad=True)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Lamb([torch.zeros(2, requires_grad=True)])  # default weight_decay=1e-2 adapts
        Lars([torch.zeros(2, requires_grad=True)], always_adapt=True)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (Lamb, {"eps": -1.0}, "eps"),
        (Lamb, {"max_grad_norm": -1.0}, "max_grad_norm"),
        (Lamb, {"betas": (0.9, 1.5)}, "betas"),
        (Lars, {"momentum": 1.0}, "momentum"),
        (Lars, {"trust_coeff": 0.0}, "trust_coeff"),
        (Lars, {"nesterov": True, "momentum": 0.0}, "nesterov"),
        (Lars, {"lr": float("inf")}, "lr"),
    ],
)
def test_validation(cls, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        cls([torch.zeros(2, requires_grad=True)], **kwargs)


def test_registry_and_build_groups() -> None:
    assert resolve("Lamb")[0].cls is Lamb and resolve("lars")[0].cls is Lars
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, "lamb", lr=1e-3, weight_decay=0.01, trust_clip=True)
    # biases and the norm gain land in the wd=0 group, which NVLAMB does not adapt
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.01]
    opt = build_optimizer(model, "lars", lr=0.1, weight_decay=1e-4, nesterov=True)
    assert isinstance(opt, Lars) and opt.param_groups[0]["nesterov"]


def test_lamb_global_clip_survives_deepcopy() -> None:
    import copy

    opt = Lamb([torch.zeros(2, requires_grad=True)], max_grad_norm=5.0)
    assert copy.deepcopy(opt).max_grad_norm == 5.0
