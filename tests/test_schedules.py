"""Golden tests: every schedule shape against torch's schedulers and Hugging Face's, at every step.

The reference optimizer holds float64 lrs; we compare ``initial_lr * schedule(t)`` with the lr the
reference sets before optimizer step ``t``, to 1e-12 absolute.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim import lr_scheduler as tls
from transformers import get_scheduler, get_wsd_schedule

from lightning_opt.schedules import SHAPES, ScheduleConfig, plateau_init, plateau_update, plot, plot_schedule_main

LRS = (0.1, 0.03)


def _optimizer(lrs=LRS, kind: str = "sgd") -> torch.optim.Optimizer:
    groups = [{"params": [torch.zeros(1, dtype=torch.float64, requires_grad=True)], "lr": lr} for lr in lrs]
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lrs[0])
    return torch.optim.SGD(groups, lr=lrs[0], momentum=0.9)


def _reference(make, steps: int, lrs=LRS, kind: str = "sgd", key: str = "lr") -> torch.Tensor:
    opt = _optimizer(lrs, kind)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append([g[key][0] if key == "betas" else g[key] for g in opt.param_groups])
        opt.step()
        sched.step()
    return torch.tensor(out, dtype=torch.float64)


def _ours(config: ScheduleConfig, steps: int, lrs=LRS, total: int | None = None) -> torch.Tensor:
    sched = config.resolve(total)
    return torch.tensor([[lr * sched(t) for lr in lrs] for t in range(steps)], dtype=torch.float64)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


T = 40


# --- Hugging Face get_scheduler ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("hf_name", "hf_kwargs", "config"),
    [
        ("constant_with_warmup", {}, {"shape": "constant", "warmup_steps": 7}),
        ("linear", {}, {"shape": "linear", "warmup_steps": 5}),
        ("linear", {}, {"shape": "linear", "warmup_ratio": 0.1}),  # ceil(0.1 * 40) = 4 warmup steps
        ("cosine", {}, {"shape": "cosine", "warmup_steps": 6}),
        ("cosine_with_min_lr", {"min_lr_rate": 0.1}, {"shape": "cosine", "warmup_steps": 6, "min_lr_ratio": 0.1}),
        (
            "cosine_with_restarts",
            {"num_cycles": 3},
            {"shape": "cosine_restarts", "warmup_steps": 10, "restart_period": 10},
        ),
        (
            "polynomial",
            {"power": 2.0, "lr_end": 1e-7},
            {"shape": "polynomial", "warmup_steps": 5, "power": 2.0, "min_lr_ratio": 1e-6},
        ),
        ("inverse_sqrt", {}, {"shape": "inverse_sqrt", "warmup_steps": 10}),
        ("inverse_sqrt", {"timescale": 25}, {"shape": "inverse_sqrt", "warmup_steps": 10, "timescale": 25}),
        (  # HF's newer variant warms up as (t+1)/W and starts its cosine one step in
            "cosine_warmup_with_min_lr",
            {"min_lr_rate": 0.1},
            {
                "shape": "cosine",
                "warmup_steps": 6,
                "min_lr_ratio": 0.1,
                "warmup_type": "linear_inclusive",
                "decay_offset": 1,
            },
        ),
    ],
)
def test_matches_hugging_face(hf_name, hf_kwargs, config):
    warmup = config.get("warmup_steps", int(config.get("warmup_ratio", 0) * T))
    lrs = LRS[:1] if hf_name == "polynomial" else LRS  # HF's polynomial reads optimizer.defaults["lr"]

    def make(opt):
        return get_scheduler(
            hf_name, opt, num_warmup_steps=warmup, num_training_steps=T, scheduler_specific_kwargs=hf_kwargs
        )

    _close(_ours(ScheduleConfig(**config), T, lrs, total=T), _reference(make, T, lrs))


@pytest.mark.parametrize("decay_shape", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1])
def test_wsd_matches_hugging_face(decay_shape, min_lr_ratio):
    # HF's WSD warmup rises from min_lr_ratio: warmup_init_ratio=min_lr_ratio is the matching option
    config = ScheduleConfig(
        "wsd",
        warmup_steps=6,
        decay_steps=12,
        decay_shape=decay_shape,
        min_lr_ratio=min_lr_ratio,
        warmup_init_ratio=min_lr_ratio,
    )

    def make(opt):
        return get_wsd_schedule(opt, 6, 12, num_training_steps=T, decay_type=decay_shape, min_lr_ratio=min_lr_ratio)

    _close(_ours(config, T + 5, total=T), _reference(make, T + 5))  # past the end: min_lr_ratio


def test_wsd_through_get_scheduler_with_stable_steps():
    def make(opt):
        kw = {"num_stable_steps": 20, "num_decay_steps": 10, "decay_type": "linear"}
        return get_scheduler("warmup_stable_decay", opt, num_warmup_steps=5, scheduler_specific_kwargs=kw)

    config = ScheduleConfig("wsd", warmup_steps=5, decay_steps=10, decay_ratio=None)
    _close(_ours(config, 35, total=35), _reference(make, 35))


def test_wsd_exponential_decay_is_geometric_to_min_lr():
    r, d = 0.01, 10
    s = ScheduleConfig("wsd", warmup_steps=4, decay_steps=d, decay_shape="exponential", min_lr_ratio=r).resolve(30)
    vals = s.values(32)
    assert vals[19] == 1.0 and vals[20] == 1.0  # decay starts at 30 - 10
    ratios = [vals[t + 1] / vals[t] for t in range(20, 29)]
    torch.testing.assert_close(
        torch.tensor(ratios, dtype=torch.float64),
        torch.full((9,), r ** (1 / d), dtype=torch.float64),
        rtol=0,
        atol=1e-12,
    )
    assert vals[30] == pytest.approx(r, abs=1e-15) and vals[31] == pytest.approx(r, abs=1e-15)


# --- torch schedulers ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "config"),
    [
        (
            lambda o: tls.LinearLR(o, start_factor=1.0, end_factor=0.2, total_iters=T),
            {"shape": "linear", "min_lr_ratio": 0.2},
        ),
        (lambda o: tls.LambdaLR(o, lambda t: min(1.0, t / 8)), {"shape": "constant", "warmup_steps": 8}),
        (
            lambda o: tls.CosineAnnealingWarmRestarts(o, T_0=6, T_mult=2, eta_min=0.0),
            {"shape": "cosine_restarts", "restart_period": 6, "period_mult": 2},
        ),
        (lambda o: tls.CosineAnnealingWarmRestarts(o, T_0=7), {"shape": "cosine_restarts", "restart_period": 7}),
        (lambda o: tls.PolynomialLR(o, total_iters=T, power=2.0), {"shape": "polynomial", "power": 2.0}),
        (lambda o: tls.ExponentialLR(o, gamma=0.9), {"shape": "exponential", "gamma": 0.9}),
        (lambda o: tls.StepLR(o, step_size=4, gamma=0.5), {"shape": "step", "step_size": 4, "gamma": 0.5}),
        (lambda o: tls.StepLR(o, step_size=4), {"shape": "step", "step_size": 4}),
        (
            lambda o: tls.MultiStepLR(o, milestones=[5, 12, 20], gamma=0.3),
            {"shape": "multistep", "milestones": [5, 12, 20], "gamma": 0.3},
        ),
    ],
)
def test_matches_torch(make, config):
    _close(_ours(ScheduleConfig(**config), T, total=T), _reference(make, T))


def test_cosine_min_lr_matches_torch_cosine_annealing():
    lr, r = 0.1, 0.05
    make = lambda o: tls.CosineAnnealingLR(o, T_max=T, eta_min=r * lr)
    _close(_ours(ScheduleConfig("cosine", min_lr_ratio=r), T, (lr,), total=T), _reference(make, T, (lr,)))


def test_cosine_restarts_eta_min_matches_torch():
    lr, r = 0.1, 0.2
    make = lambda o: tls.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=3, eta_min=r * lr)
    config = ScheduleConfig("cosine_restarts", restart_period=5, period_mult=3, min_lr_ratio=r)
    _close(_ours(config, T, (lr,), total=T), _reference(make, T, (lr,)))


def test_floors_apply_to_step_shapes():
    s = ScheduleConfig("exponential", gamma=0.5, min_lr_ratio=0.1, warmup_steps=2).resolve(None)
    assert [s(t) for t in range(2, 8)] == [1.0, 0.5, 0.25, 0.125, 0.1, 0.1]
    s = ScheduleConfig("inverse_sqrt", warmup_steps=4, min_lr_ratio=0.4).resolve(None)
    assert s(4) == 1.0 and s(16) == 0.5 and s(100) == 0.4


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"anneal_strategy": "linear", "three_phase": True},
        {"pct_start": 0.25, "div_factor": 10.0, "final_div_factor": 100.0, "base_momentum": 0.8, "max_momentum": 0.9},
    ],
)
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_onecycle_matches_torch_lr_and_momentum(kwargs, kind):
    def make(opt):
        return tls.OneCycleLR(opt, max_lr=list(LRS), total_steps=T, **kwargs)

    config = ScheduleConfig("onecycle", **kwargs)
    _close(_ours(config, T, total=T), _reference(make, T, kind=kind))
    key = "betas" if kind == "adam" else "momentum"
    sched = config.resolve(T)
    ours_m = torch.tensor([[sched.momentum(t)] * len(LRS) for t in range(T)], dtype=torch.float64)
    _close(ours_m, _reference(make, T, kind=kind, key=key))


def test_onecycle_warmup_steps_set_the_rising_phase():
    make = lambda o: tls.OneCycleLR(o, max_lr=list(LRS), total_steps=T, pct_start=0.25)
    _close(_ours(ScheduleConfig("onecycle", warmup_steps=10), T, total=T), _reference(make, T))
    _close(_ours(ScheduleConfig("onecycle", warmup_ratio=0.25), T, total=T), _reference(make, T))
    assert ScheduleConfig("onecycle", cycle_momentum=False).resolve(T).momentum(3) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"mode": "max", "threshold_mode": "abs", "threshold": 0.05, "patience": 1, "cooldown": 2, "factor": 0.5},
        {"patience": 0, "factor": 0.5, "min_lr_ratio": 0.2},
    ],
)
def test_plateau_matches_reduce_lr_on_plateau(kwargs):
    metrics = [1.0, 0.9, 0.95, 0.93, 0.91, 0.92, 0.8, 0.85, 0.86, 0.87, 0.9, 0.88, 0.89] * 2
    torch_kw = {k: v for k, v in kwargs.items() if k != "min_lr_ratio"}
    config = ScheduleConfig("plateau", **{**kwargs, "patience": kwargs.get("patience", 2)})
    opt = _optimizer()
    ref = tls.ReduceLROnPlateau(
        opt,
        **{**torch_kw, "patience": config.option("patience")},
        min_lr=[kwargs.get("min_lr_ratio", 0.0) * lr for lr in LRS],
    )
    state, ours, theirs = plateau_init(config), [], []
    for m in metrics:
        ref.step(m)
        state = plateau_update(config, state, m)
        theirs.append([g["lr"] for g in opt.param_groups])
        ours.append([lr * state["scale"] for lr in LRS])
    _close(torch.tensor(ours, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64))
    assert state["scale"] < 1.0  # the sequence does reduce


# --- warmup and WSD options ----------------------------------------------------------------------
def test_warmup_init_ratio_and_every_shape_takes_a_warmup():
    s = ScheduleConfig("cosine", warmup_steps=4, warmup_init_ratio=0.2).resolve(20)
    assert [s(t) for t in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0], abs=1e-15)
    extra = {
        "exponential": {"gamma": 0.9},
        "step": {"step_size": 3},
        "multistep": {"milestones": [6]},
        "wsd": {"decay_steps": 5},
    }
    for shape in SHAPES:
        if shape == "onecycle":
            continue
        s = ScheduleConfig(shape, warmup_steps=4, **extra.get(shape, {})).resolve(20)
        assert [s(t) for t in range(4)] == [0.0, 0.25, 0.5, 0.75], shape


def test_wsd_longer_run_extends_the_stable_phase_and_decay_start_moves_the_decay():
    short = ScheduleConfig("wsd", warmup_steps=2, decay_steps=4).resolve(12)
    longer = ScheduleConfig("wsd", warmup_steps=2, decay_steps=4).resolve(20)
    assert short.values(8) == longer.values(8)
    assert short(9) == 0.75 and longer(9) == 1.0 and longer(17) == short(9)
    now = ScheduleConfig("wsd", warmup_steps=2, decay_steps=4, decay_start=10).resolve(20)
    assert now(9) == 1.0 and now(10) == 1.0 and now(12) == 0.5 and now(14) == 0.0 and now(19) == 0.0


# --- errors at construction ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": "cosin"}, "expected one of constant, linear, cosine, cosine_restarts"),
        ({"warmup_steps": 50, "total_steps": 40}, "warmup is longer than the run"),
        (
            {"shape": "wsd", "warmup_steps": 10, "decay_steps": 31, "total_steps": 40},
            "decay is longer than what is left",
        ),
        ({"shape": "wsd", "decay_steps": 10, "decay_start": 35, "total_steps": 40}, "ends after the run"),
        ({"min_lr_ratio": 1.5}, r"min_lr_ratio=1.5.*\[0, 1\]"),
        ({"min_lr_ratio": -0.1}, "min_lr_ratio"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 3, "warmup_ratio": 0.1}, "not both"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
        ({"shape": "cosine", "gamma": 0.5}, "only shape 'exponential'"),
        ({"shape": "cosine", "decay_steps": 5}, "only shape 'wsd'"),
        ({"shape": "cosine", "decay_shape": "1-sqrt"}, "only shape 'wsd'"),
        ({"shape": "wsd"}, "needs decay_steps or decay_ratio"),
        ({"shape": "wsd", "decay_ratio": 0.2, "decay_shape": "exponential"}, "min_lr_ratio > 0"),
        ({"shape": "wsd", "decay_ratio": 0.2, "decay_shape": "quadratic"}, "decay_shape"),
        ({"shape": "exponential"}, "needs gamma"),
        ({"shape": "step"}, "needs step_size"),
        ({"shape": "multistep", "milestones": [5, 3]}, "strictly increasing"),
        ({"shape": "onecycle", "pct_start": 0.3, "warmup_steps": 3}, "not both"),
        ({"shape": "onecycle", "min_lr_ratio": 0.1}, "final_div_factor"),
        ({"shape": "plateau", "factor": 1.5}, "factor"),
        ({"shape": "constant", "min_lr_ratio": 0.1}, "no decay"),
        ({"warmup_type": "linear_inclusive"}, "there is no warmup"),
        ({"warmup_init_ratio": 0.1}, "there is no warmup"),
        ({"shape": "onecycle", "warmup_type": "log", "warmup_steps": 5}, "anneal_strategy"),
        ({"warmup_type": "log", "warmup_steps": 1}, "warmup_steps >= 2"),
        ({"warmup_type": "cubic", "warmup_steps": 3}, "expected 'linear', 'linear_inclusive' or 'log'"),
        ({"shape": "linear", "decay_offset": 1}, "only shape 'cosine'"),
    ],
)
def test_impossible_settings_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScheduleConfig(**kwargs)


def test_run_length_is_required_when_needed():
    with pytest.raises(ValueError, match="needs the run length"):
        ScheduleConfig("cosine").resolve(None)
    assert ScheduleConfig("exponential", gamma=0.5).resolve(None)(3) == 0.125


# --- the picture ----------------------------------------------------------------------------------
def test_plot_and_plot_schedule_command(tmp_path):
    out = plot(ScheduleConfig("onecycle"), tmp_path / "a.png", total_steps=50, base_lr=0.1)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_opt.callbacks.LRSchedule\n"
        "      init_args: {shape: wsd, warmup_steps: 10, decay_ratio: 0.2}\n"
    )
    assert plot_schedule_main(["--config", str(yaml_path), "--total-steps", "100", "-o", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "b.png").stat().st_size > 1000
    assert (
        plot_schedule_main(["multistep", "--milestones", "10", "20", "--steps", "30", "-o", str(tmp_path / "c.png")])
        == 0
    )
    with pytest.raises(ValueError, match="needs decay_steps"):
        plot_schedule_main(["wsd", "--total-steps", "100", "-o", str(tmp_path / "d.png")])
    assert math.isfinite(ScheduleConfig("wsd", decay_ratio=0.1).resolve(100)(99))


def test_ratios_round_up_robustly():
    assert ScheduleConfig("linear", warmup_ratio=0.07).resolve(100).warmup_steps == 7  # 0.07 * 100 = 7.000000000000001
    assert ScheduleConfig("linear", warmup_ratio=0.05).resolve(30).warmup_steps == 2  # ceil(1.5), as HF's Trainer
    s = ScheduleConfig("wsd", warmup_ratio=0.05, decay_ratio=0.2).resolve(2)  # a tiny run still decays
    assert (s.warmup_steps, s.decay_steps, s.decay_start) == (1, 1, 1)


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lightning-opt\[plot\]'"):
        plot(ScheduleConfig("cosine"), tmp_path / "x.png", total_steps=10)


def test_plot_schedule_is_a_lightning_opt_command(tmp_path):
    from lightning_opt.cli import main

    assert (
        main(
            [
                "plot-schedule",
                "cosine_restarts",
                "--restart-period",
                "10",
                "--period-mult",
                "2",
                "--total-steps",
                "70",
                "-o",
                str(tmp_path / "r.png"),
            ]
        )
        == 0
    )
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
