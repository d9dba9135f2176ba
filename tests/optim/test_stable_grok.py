"""StableAdamW against optimi.StableAdamW and GrokAdamW against the grokadamw package, in float64."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from lightning_opt.optim import build_optimizer, resolve
from lightning_opt.optim.grokadamw import GrokAdamW, grokking_signal_from_losses
from lightning_opt.optim.stable_adamw import StableAdamW, debias_beta

optimi = pytest.importorskip("optimi")
grokadamw = pytest.importorskip("grokadamw")

SHAPES = [(6, 5), (5,), (3, 4, 2), (7,)]


def _params(dtype: torch.dtype = torch.float64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in SHAPES]


def _run(make_opt, params, steps: int = 20, seed: int = 1, spike_at: int | None = None, before_step=None):
    opt = make_opt(params)
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        for p in params:
            grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if spike_at is not None and t == spike_at:
                grad = grad * 50.0  # a loss spike: StableAdamW's clipping must engage
            p.grad = grad.to(p.dtype)
        if before_step is not None:
            before_step(opt, t)
        opt.step()
    return [p.detach().clone() for p in params], opt


# ----------------------------------------------------------------------------------- StableAdamW


def _stable_groups(params, **extra):
    return [
        {"params": params[:2], "lr": 3e-2, "weight_decay": 0.1, **extra},
        {"params": params[2:], "lr": 1e-2, "weight_decay": 0.0, **extra},
    ]


@pytest.mark.parametrize("betas, eps", [((0.9, 0.99), 1e-6), ((0.8, 0.95), 1e-3)])
def test_stable_adamw_matches_optimi_float64(betas, eps) -> None:
    ours, _ = _run(lambda ps: StableAdamW(_stable_groups(ps), betas=betas, eps=eps), _params(), spike_at=12)
    ref, _ = _run(
        lambda ps: optimi.StableAdamW(_stable_groups(ps), lr=1.0, betas=betas, eps=eps, foreach=False, triton=False),
        _params(),
        spike_at=12,
    )
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_stable_adamw_decouple_lr_matches_optimi() -> None:
    """Fully decoupled decay: optimi takes one max_lr for all groups; we default to each group's lr.

    Setting max_lr per group makes the two identical; the lr drops mid-run like a schedule would.
    """

    def schedule(opt, t):
        if t == 10:
            for group in opt.param_groups:
                group["lr"] *= 0.25

    def make(cls, **kw):
        return lambda ps: cls(
            [
                {"params": ps[:2], "lr": 3e-2, "max_lr": 3e-2, "weight_decay": 0.5},
                {"params": ps[2:], "lr": 1e-2, "max_lr": 1e-2, "weight_decay": 0.5},
            ],
            decouple_lr=True,
            **kw,
        )

    ours, _ = _run(make(StableAdamW), _params(), before_step=schedule)
    ref, _ = _run(make(optimi.StableAdamW, lr=1.0, foreach=False, triton=False), _params(), before_step=schedule)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # and the default max_lr is each group's initial lr (so decay is no longer scaled by lr)
    dflt, opt = _run(
        lambda ps: StableAdamW(
            [{"params": ps[:2], "lr": 3e-2, "weight_decay": 0.5}, {"params": ps[2:], "lr": 1e-2, "weight_decay": 0.5}],
            decouple_lr=True,
        ),
        _params(),
        before_step=schedule,
    )
    assert [g["max_lr"] for g in opt.param_groups] == [3e-2, 1e-2]
    for a, b in zip(ours, dflt):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    coupled, _ = _run(
        lambda ps: StableAdamW(
            [{"params": ps[:2], "lr": 3e-2, "weight_decay": 0.5}, {"params": ps[2:], "lr": 1e-2, "weight_decay": 0.5}]
        ),
        _params(),
        before_step=schedule,
    )
    assert not torch.allclose(coupled[0], dflt[0])


def test_stable_adamw_decouple_lr_add_param_group() -> None:
    """A group added later gets max_lr from its lr too, and steps exactly like one given at build time."""
    params = _params()

    def added(ps):
        opt = StableAdamW([{"params": ps[:2], "lr": 3e-2, "weight_decay": 0.5}], decouple_lr=True)
        opt.add_param_group({"params": ps[2:], "lr": 1e-2, "weight_decay": 0.5})
        return opt

    ours, opt = _run(added, params)
    assert [g["max_lr"] for g in opt.param_groups] == [3e-2, 1e-2]
    built, _ = _run(
        lambda ps: StableAdamW(
            [{"params": ps[:2], "lr": 3e-2, "weight_decay": 0.5}, {"params": ps[2:], "lr": 1e-2, "weight_decay": 0.5}],
            decouple_lr=True,
        ),
        _params(),
    )
    for a, b in zip(ours, built):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the group's own max_lr is kept, and the build-time checks apply to added groups
    opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "lr": 1e-3, "max_lr": 5e-3})
    assert opt.param_groups[-1]["max_lr"] == 5e-3
    with pytest.raises(ValueError, match="needs max_lr"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "lr": 0.0})
    with pytest.raises(ValueError, match="max_lr=-1"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "max_lr": -1})
    plain = StableAdamW([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="decouple_lr=True"):
        plain.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "max_lr": 1e-3})
    plain.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "lr": 1e-3})
    assert plain.param_groups[-1]["max_lr"] is None


def test_stable_adamw_update_clipping_engages() -> None:
    """A spiking gradient makes RMS > 1, so the step is lr/RMS (and without the spike it is lr)."""
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = StableAdamW([p], lr=1.0, betas=(0.9, 0.99), weight_decay=0.0, eps=1e-12)
    p.grad = torch.ones(4, dtype=torch.float64)
    opt.step()  # step 1: m = g, v = g^2, RMS = 1, update = -lr * sign
    torch.testing.assert_close(p.detach(), -torch.ones(4, dtype=torch.float64))
    p.grad = torch.full((4,), 100.0, dtype=torch.float64)
    opt.step()
    b1, b2 = debias_beta(0.9, 2), debias_beta(0.99, 2)
    m, v = b1 * 1 + (1 - b1) * 100, b2 * 1 + (1 - b2) * 100**2
    rms = math.sqrt(100**2 / v)
    assert rms > 1
    expected = -1 - (1 / rms) * m / math.sqrt(v)
    torch.testing.assert_close(p.detach(), torch.full((4,), expected, dtype=torch.float64))


def test_stable_adamw_validation() -> None:
    ps = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="eps=-1"):
        StableAdamW(ps, eps=-1)
    with pytest.raises(ValueError, match="max_lr"):
        StableAdamW(ps, max_lr=1e-3)  # without decouple_lr it would be ignored
    with pytest.raises(ValueError, match="max_lr=0"):
        StableAdamW(ps, decouple_lr=True, max_lr=0)
    with pytest.raises(ValueError, match="betas"):
        StableAdamW(ps, betas=(1.0, 0.9))


# ------------------------------------------------------------------------------------- GrokAdamW


def _grok_ref(params, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package enters the deprecated torch.cuda.amp.autocast
        return grokadamw.GrokAdamW(params, **kw)


class _QuietRef:
    """Runs the reference's step with its autocast deprecation warning silenced."""

    def __init__(self, opt):
        self.opt = opt
        self.param_groups = opt.param_groups

    def step(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.opt.step()


GROK_CASES = [
    {},  # package defaults: clipping 1.0, alpha 0.98, lamb 2, gamma 0.1
    {
        "betas": (0.8, 0.95),
        "eps": 1e-6,
        "weight_decay": 0.3,
        "alpha_init": 0.9,
        "lamb": 5.0,
        "gamma": 0.3,
        "gradient_clipping": 0.0,
    },
    {"gradient_clipping": 3.0, "grokking_signal_decay_rate": 2.0},
]


@pytest.mark.parametrize("kw", GROK_CASES)
def test_grokadamw_matches_package_float64(kw) -> None:
    def groups(ps):
        return [{"params": ps[:3], "lr": 1e-2}, {"params": ps[3:], "lr": 3e-3}]

    def losses(opt, t):  # the default signal reads these group keys; both implementations do
        opt.param_groups[0]["train_loss"] = 1.0 / (t + 1)
        opt.param_groups[0]["eval_loss"] = 2.0

    ours, _ = _run(lambda ps: GrokAdamW(groups(ps), **kw), _params(), before_step=losses)
    ref, _ = _run(lambda ps: _QuietRef(_grok_ref(groups(ps), **kw)), _params(), before_step=losses)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_grokadamw_signal_fns_match_package() -> None:
    calls = {"n": 0}

    def fn():
        calls["n"] += 1
        return 0.1 * (calls["n"] % 7)

    def fn_none():
        return None

    ours, _ = _run(
        lambda ps: GrokAdamW(ps, lr=1e-2, grokking_signal_fns=[fn, fn_none], grokking_signal_decay_rate=3.0), _params()
    )
    calls["n"] = 0
    ref, _ = _run(
        lambda ps: _QuietRef(_grok_ref(ps, lr=1e-2, grokking_signal_fns=[fn, fn_none], grokking_signal_decay_rate=3.0)),
        _params(),
    )
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # and the signal matters
    plain, _ = _run(lambda ps: GrokAdamW(ps, lr=1e-2), _params())
    assert not torch.allclose(plain[0], ours[0])


def test_grokadamw_leaves_grad_untouched_and_state_in_state_dict() -> None:
    params = _params()
    opt = GrokAdamW(params, lr=1e-2, gradient_clipping=0.5)
    grads = [torch.full(p.shape, 3.0, dtype=torch.float64) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g), "the clipping must not write into p.grad"
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "grok_ema"}
    torch.save(sd, __import__("io").BytesIO())  # no callables in the groups


@pytest.mark.parametrize("frozen", [0, 2, 3])
def test_grokadamw_layer_index_counts_only_params_with_grad(frozen) -> None:
    """A tensor without a grad is skipped by the layer index ``i``, as in the package.

    The reference runs on ``params_with_grad``, so a frozen first tensor shifts every later tensor's
    beta1 by one layer; both must agree whichever position the frozen tensor has.
    """

    def run(make_opt):
        params = _params()
        opt = make_opt(params)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            for i, p in enumerate(params):
                grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
                p.grad = None if i == frozen else grad
            opt.step()
        return params

    kw = {"lr": 1e-2, "gamma": 0.5, "gradient_clipping": 0.0}
    ours = run(lambda ps: GrokAdamW(ps, **kw))
    ref = run(lambda ps: _QuietRef(_grok_ref(ps, **kw)))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.equal(ours[frozen], _params()[frozen]), "a tensor without a grad must not move"


def test_grokadamw_validation_and_signal() -> None:
    ps = [torch.zeros(2, requires_grad=True)]
    for kw, match in [
        ({"alpha_init": 1.5}, "alpha_init"),
        ({"gamma": 1.0}, "gamma"),
        ({"gradient_clipping": -1}, "gradient_clipping"),
        ({"eps": float("nan")}, "eps"),
    ]:
        with pytest.raises(ValueError, match=match):
            GrokAdamW(ps, **kw)
    with pytest.raises(TypeError, match="callables"):
        GrokAdamW(ps, grokking_signal_fns=lambda: 1.0)
    assert grokking_signal_from_losses(None, 1.0) == 0.0
    assert grokking_signal_from_losses(1.0, 2.0) == 0.5
    assert grokking_signal_from_losses(2.0, 1.0) == 0.0


def test_registry() -> None:
    model = torch.nn.Linear(3, 2)
    assert resolve("stable_adamw")[0].cls is StableAdamW
    assert resolve("grokadamw")[0].cls is GrokAdamW
    opt = build_optimizer(model, "stable_adamw", lr=1e-3, weight_decay=0.1, decouple_lr=True)
    assert all(g["max_lr"] == g["lr"] for g in opt.param_groups)
    opt = build_optimizer(model, "grokadamw", lr=1e-3, lamb=3.0)
    assert opt.param_groups[0]["lamb"] == 3.0
    copy.deepcopy(opt.state_dict())


def test_grokadamw_signal_fns_survive_deepcopy() -> None:
    def fn():
        return 1.0

    opt = GrokAdamW([torch.zeros(2, requires_grad=True)], grokking_signal_fns=[fn])
    assert copy.deepcopy(opt).grokking_signal_fns == [fn]
