"""DeepSpeed's scheduler block -> LRSchedule, value-tested against DeepSpeed's formulas.

The reference below re-writes ``deepspeed/runtime/lr_schedules.py`` (WarmupLR, WarmupDecayLR,
WarmupCosineLR) as float64 functions of ``last_batch_iteration``; DeepSpeed itself is not installed.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_opt.callbacks import LRSchedule
from lightning_opt.deepspeed_schedule import lr_schedule_from_deepspeed


def _ds_warmup_gamma(t: int, warmup: int, warmup_type: str) -> float:
    warmup = max(2, warmup)
    if warmup_type == "log":
        return (1.0 / math.log(warmup)) * math.log(t + 1)
    return t / warmup


def ds_warmup_lr(t, *, warmup_min_lr=0.0, warmup_max_lr, warmup_num_steps=1000, warmup_type="log"):
    gamma = _ds_warmup_gamma(t, warmup_num_steps, warmup_type) if t < max(2, warmup_num_steps) else 1.0
    return warmup_min_lr + (warmup_max_lr - warmup_min_lr) * gamma


def ds_warmup_decay_lr(
    t, *, total_num_steps, warmup_min_lr=0.0, warmup_max_lr=0.001, warmup_num_steps=1000, warmup_type="log"
):
    w = max(2, warmup_num_steps)
    if t < w:
        gamma = _ds_warmup_gamma(t, warmup_num_steps, warmup_type)
    else:
        gamma = max(0.0, float(total_num_steps - t) / float(max(1.0, total_num_steps - w)))
    return warmup_min_lr + (warmup_max_lr - warmup_min_lr) * gamma


def ds_warmup_cosine_lr(
    t, *, lr, total_num_steps, warmup_min_ratio=0.0, warmup_num_steps=1000, cos_min_ratio=0.0001, warmup_type="log"
):
    w = max(2, warmup_num_steps)
    if t < w:
        ratio = _ds_warmup_gamma(t, warmup_num_steps, warmup_type)
        return lr * (warmup_min_ratio + ratio * (1.0 - warmup_min_ratio))
    progress = min(1.0, (t - w + 1) / max(1, total_num_steps - w))
    ratio = max(0.0, cos_min_ratio + (1.0 - cos_min_ratio) * (1 + math.cos(math.pi * progress)) / 2)
    return lr * ratio


def _ours(cb: LRSchedule, lr: float, steps: int, total: int | None = None) -> torch.Tensor:
    sched = cb.config.resolve(total)
    return torch.tensor([lr * sched(t) for t in range(steps)], dtype=torch.float64)


def _close(a, b):
    torch.testing.assert_close(a, torch.tensor(b, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("warmup_type", ["log", "linear"])
@pytest.mark.parametrize(("warmup_min_lr", "warmup_num_steps"), [(0.0, 10), (1e-4, 10), (0.0, 1)])
def test_warmup_lr(warmup_type, warmup_min_lr, warmup_num_steps):
    params = {
        "warmup_min_lr": warmup_min_lr,
        "warmup_max_lr": 3e-3,
        "warmup_num_steps": warmup_num_steps,
        "warmup_type": warmup_type,
    }
    cb = lr_schedule_from_deepspeed({"type": "WarmupLR", "params": params})
    _close(_ours(cb, 3e-3, 20), [ds_warmup_lr(t, **params) for t in range(20)])


@pytest.mark.parametrize("warmup_type", ["log", "linear"])
@pytest.mark.parametrize("warmup_min_lr", [0.0, 2e-4])
def test_warmup_decay_lr(warmup_type, warmup_min_lr):
    params = {
        "total_num_steps": 40,
        "warmup_min_lr": warmup_min_lr,
        "warmup_max_lr": 2e-3,
        "warmup_num_steps": 8,
        "warmup_type": warmup_type,
    }
    cb = lr_schedule_from_deepspeed({"type": "WarmupDecayLR", "params": params}, optimizer_lr=2e-3)
    _close(_ours(cb, 2e-3, 45), [ds_warmup_decay_lr(t, **params) for t in range(45)])


@pytest.mark.parametrize("warmup_type", ["log", "linear"])
@pytest.mark.parametrize(("warmup_min_ratio", "cos_min_ratio"), [(0.0, 0.0001), (0.1, 0.05)])
def test_warmup_cosine_lr(warmup_type, warmup_min_ratio, cos_min_ratio):
    params = {
        "total_num_steps": 50,
        "warmup_min_ratio": warmup_min_ratio,
        "warmup_num_steps": 7,
        "cos_min_ratio": cos_min_ratio,
        "warmup_type": warmup_type,
    }
    cb = lr_schedule_from_deepspeed({"type": "WarmupCosineLR", "params": params})
    _close(_ours(cb, 0.01, 55), [ds_warmup_cosine_lr(t, lr=0.01, **params) for t in range(55)])


def test_defaults_auto_values_and_synonym():
    block = {
        "type": "WarmupCosineLR",
        "params": {"total_num_steps": "auto", "warmup_num_steps": "auto", "cosine_min_ratio": 0.2},
    }
    cb = lr_schedule_from_deepspeed(block, total_num_steps=30, warmup_num_steps=5, lr=1e-3, weight_decay=0.1)
    expected = [
        ds_warmup_cosine_lr(t, lr=1.0, total_num_steps=30, warmup_num_steps=5, cos_min_ratio=0.2) for t in range(30)
    ]
    _close(_ours(cb, 1.0, 30), expected)
    cb = lr_schedule_from_deepspeed(
        {"type": "WarmupCosineLR", "params": {"total_num_steps": 2000}}
    )  # DeepSpeed's defaults
    _close(_ours(cb, 1.0, 2000), [ds_warmup_cosine_lr(t, lr=1.0, total_num_steps=2000) for t in range(2000)])
    # WarmupLR's warmup_max_lr defaults to the optimizer's lr
    cb = lr_schedule_from_deepspeed(
        {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-4, "warmup_num_steps": 4}}, optimizer_lr=1e-3
    )
    _close(
        _ours(cb, 1e-3, 8),
        [ds_warmup_lr(t, warmup_min_lr=1e-4, warmup_max_lr=1e-3, warmup_num_steps=4) for t in range(8)],
    )
    # total_num_steps=None: the run length comes from the trainer
    cb = lr_schedule_from_deepspeed(
        {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto"}}, total_num_steps=None
    )
    assert cb.config.total_steps is None and cb.config.resolve(3000)(2999) == pytest.approx(1 / 2000)


@pytest.mark.parametrize(
    ("block", "kwargs", "match"),
    [
        ({"type": "OneCycle", "params": {}}, {}, "supported: WarmupLR, WarmupDecayLR, WarmupCosineLR"),
        ({"type": "WarmupCosineLR", "params": {"total_num_steps": "auto"}}, {}, r"params.total_num_steps is \"auto\""),
        (
            {"type": "WarmupCosineLR", "params": {"total_num_steps": 10, "warmup_num_steps": "auto"}},
            {"warmup_num_steps": None},
            "warmup_num_steps",
        ),
        ({"type": "WarmupDecayLR", "params": {"warmup_max_lr": 1e-3}}, {}, "needs params.total_num_steps"),
        ({"type": "WarmupLR", "params": {"warmup_max_lr": 1e-3, "gamma": 0.1}}, {}, "takes no gamma"),
        ({"type": "WarmupLR", "params": {"warmup_type": "exp"}}, {}, "warmup_type"),
        (
            {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-3}},
            {"optimizer_lr": 1e-4},
            "set the optimizer's lr to warmup_max_lr",
        ),
        (
            {
                "type": "WarmupCosineLR",
                "params": {"total_num_steps": 100, "cos_min_ratio": 0.1, "cosine_min_ratio": 0.1},
            },
            {},
            "keep one",
        ),
        (
            {"type": "WarmupDecayLR", "params": {"total_num_steps": 10, "warmup_num_steps": 20}},
            {},
            "warmup is longer than the run",
        ),
    ],
)
def test_errors(block, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lr_schedule_from_deepspeed(block, **kwargs)
