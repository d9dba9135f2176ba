"""from_deepspeed_config: DeepSpeed optimizer blocks, "auto" values, file paths, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightning_opt import from_deepspeed_config
from lightning_opt.demo import TinyGPT
from lightning_opt.optim.adafactor import Adafactor

AUTO_ADAMW = {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}}


def test_auto_values_are_filled() -> None:
    opt = from_deepspeed_config(AUTO_ADAMW, TinyGPT(n_layer=1), lr=3e-4, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["lr"] == 3e-4 and opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-6
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.1}


def test_auto_without_a_value_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"optimizer\.params\.eps is \"auto\""):
        from_deepspeed_config(AUTO_ADAMW, TinyGPT(n_layer=1), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)


def test_deepspeed_adam_is_adamw_unless_adam_w_mode_is_false() -> None:
    model = TinyGPT(n_layer=1)
    opt = from_deepspeed_config({"optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}}, model)
    assert type(opt) is torch.optim.AdamW
    opt = from_deepspeed_config({"optimizer": {"type": "Adam", "params": {"lr": 1e-3, "adam_w_mode": False}}}, model)
    assert type(opt) is torch.optim.Adam


def test_reads_a_json_file_and_the_bare_block(tmp_path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 8, "optimizer": {"type": "AdaFactorOptimizer", "params": {"lr": 1e-2}}}))
    assert isinstance(from_deepspeed_config(path, TinyGPT(n_layer=1)), Adafactor)
    assert isinstance(from_deepspeed_config({"type": "adagrad", "params": {"lr": 0.1}}, TinyGPT(n_layer=1)), torch.optim.Adagrad)


def test_unknown_param_and_missing_block() -> None:
    with pytest.raises(TypeError, match="takes no 'momentum'"):
        from_deepspeed_config({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "momentum": 0.9}}}, TinyGPT(n_layer=1))
    with pytest.raises(ValueError, match="no optimizer block"):
        from_deepspeed_config({"train_batch_size": 8}, TinyGPT(n_layer=1))
    with pytest.raises(FileNotFoundError):
        from_deepspeed_config("/nonexistent/ds.json", TinyGPT(n_layer=1))


def test_without_a_scheduler_block_the_schedule_is_none() -> None:
    opt, schedule = from_deepspeed_config({"optimizer": {"type": "SGD", "params": {"lr": 0.1}}}, TinyGPT(n_layer=1), with_schedule=True)
    assert isinstance(opt, torch.optim.SGD) and schedule is None


def test_muon_optimizer_with_auto_lr() -> None:
    from lightning_opt.optim.muon import Muon

    opt = from_deepspeed_config({"optimizer": {"type": "MuonOptimizer", "params": {"lr": "auto"}}}, TinyGPT(n_layer=1), lr=0.02)
    assert isinstance(opt, Muon) and opt.defaults["lr"] == 0.02


def test_scheduler_block_becomes_an_lr_schedule() -> None:
    from lightning_opt.callbacks import LRSchedule

    cfg = {
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": 0.1}},
        "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto", "warmup_num_steps": 10, "warmup_min_ratio": 0.0, "cos_min_ratio": 0.1}},
    }
    opt, schedule = from_deepspeed_config(cfg, TinyGPT(n_layer=1), with_schedule=True, lr=1e-3, total_num_steps=100)
    assert isinstance(opt, torch.optim.AdamW) and isinstance(schedule, LRSchedule)
    with pytest.raises(ValueError, match="total_num_steps"):
        from_deepspeed_config(cfg, TinyGPT(n_layer=1), with_schedule=True, lr=1e-3)


def test_a_keyword_without_an_auto_entry_is_an_error() -> None:
    cfg = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}}
    with pytest.raises(TypeError, match=r"got \['lr', 'weight_decay'\].*no \"auto\" entry"):
        from_deepspeed_config(cfg, TinyGPT(n_layer=1), lr=3e-4, weight_decay=0.1)
    sched = {**AUTO_ADAMW, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}}
    auto = {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    with pytest.raises(TypeError, match="with_schedule=True"):
        from_deepspeed_config(sched, TinyGPT(n_layer=1), with_schedule=False, warmup_num_steps=10, **auto)
    opt, schedule = from_deepspeed_config(sched, TinyGPT(n_layer=1), with_schedule=True, warmup_num_steps=10, **auto)
    assert schedule is not None


def test_a_scheduler_block_is_never_dropped_silently() -> None:
    cfg = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "scheduler": {"type": "WarmupLR", "params": {}}}
    with pytest.raises(ValueError, match=r"scheduler block \('WarmupLR'\); pass with_schedule=True"):
        from_deepspeed_config(cfg, TinyGPT(n_layer=1))
    assert isinstance(from_deepspeed_config(cfg, TinyGPT(n_layer=1), with_schedule=False), torch.optim.AdamW)
    opt, schedule = from_deepspeed_config(cfg, TinyGPT(n_layer=1), with_schedule=True)
    assert schedule is not None


# the seed configs users copy, in their own spelling (issue 10)
LION = {"type": "LionOptimizer", "params": {"lr": "auto", "weight_decay": "auto", "beta1": 0.9, "beta2": 0.99}}
SOPHIA = {
    "type": "SophiaOptimizer",
    "params": {"lr": 2e-4, "weight_decay": 0.1, "beta1": 0.965, "beta2": 0.99, "rho": 0.01},
}
ADAFACTOR = {
    "type": "AdaFactorOptimizer",
    "params": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps1": 1e-30, "eps2": 1e-3, "cliping_threshold": 1.0},
}


def test_lion_with_beta1_beta2() -> None:
    from lightning_opt.optim.lion import Lion

    opt = from_deepspeed_config(LION, TinyGPT(n_layer=1), lr=1e-4, weight_decay=0.1)
    assert isinstance(opt, Lion) and opt.defaults["betas"] == (0.9, 0.99) and opt.defaults["lr"] == 1e-4
    # one beta given: the other is the algorithm's default
    one = {"type": "LionOptimizer", "params": {"lr": 1e-4, "beta1": 0.95}}
    assert from_deepspeed_config(one, TinyGPT(n_layer=1)).defaults["betas"] == (0.95, 0.99)
    both = {"type": "LionOptimizer", "params": {"lr": 1e-4, "beta1": 0.95, "betas": [0.9, 0.99]}}
    with pytest.raises(ValueError, match="both 'betas' and 'beta1'"):
        from_deepspeed_config(both, TinyGPT(n_layer=1))


def test_sophia_with_beta1_beta2_rho() -> None:
    from lightning_opt.optim.sophia import SophiaG

    opt = from_deepspeed_config(SOPHIA, TinyGPT(n_layer=1))
    assert isinstance(opt, SophiaG)
    assert opt.defaults["betas"] == (0.965, 0.99) and opt.defaults["rho"] == 0.01


def test_adafactor_with_deepspeeds_spellings() -> None:
    opt = from_deepspeed_config(ADAFACTOR, TinyGPT(n_layer=1))
    assert isinstance(opt, Adafactor)
    d = opt.defaults
    assert (d["beta1"], d["beta2"], d["eps"], d["clip_threshold"]) == (0.9, 0.999, (1e-30, 1e-3), 1.0)
    twice = {"type": "AdaFactorOptimizer", "params": {"cliping_threshold": 1.0, "clip_threshold": 2.0}}
    with pytest.raises(ValueError, match="keep one"):
        from_deepspeed_config(twice, TinyGPT(n_layer=1))


@pytest.mark.parametrize("kind", ["Muon", "MuonOptimizer"])
def test_muon_follows_deepspeeds_engine(kind: str) -> None:
    """DeepSpeed gives both sides ``lr``; ``muon_lr``/``adam_lr`` override one side each."""
    model = TinyGPT(n_layer=1)
    opt = from_deepspeed_config({"type": kind, "params": {"lr": 0.01, "weight_decay": 0.1}}, model)
    assert opt.defaults["lr"] == 0.01 and opt.defaults["adamw_lr_ratio"] == 1.0  # not our 0.015
    params = {"lr": 0.01, "muon_lr": 0.02, "adam_lr": 4e-4, "betas": [0.8, 0.9], "eps": 1e-8, "momentum": 0.9}
    opt = from_deepspeed_config({"type": kind, "params": params}, model)
    d = opt.defaults
    assert d["lr"] == 0.02 and d["momentum"] == 0.9
    assert math.isclose(d["lr"] * d["adamw_lr_ratio"], 4e-4, rel_tol=1e-12)
    assert d["adamw_betas"] == (0.8, 0.9) and d["adamw_eps"] == 1e-8 and d["eps"] == 1e-7
    # the AdamW side really steps with adam_lr: one step of a 1-D parameter is lr-sized
    bias = next(p for p in model.parameters() if p.ndim == 1)
    before = bias.detach().clone()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert torch.allclose((before - bias.detach()).abs(), torch.full_like(before, 4e-4), rtol=1e-4)
    # no lr at all: MuonWithAuxAdam's own defaults (Keller's 0.02 and 3e-4)
    opt = from_deepspeed_config({"type": kind, "params": {}}, model)
    assert opt.defaults["lr"] == 0.02 and math.isclose(opt.defaults["lr"] * opt.defaults["adamw_lr_ratio"], 3e-4)


@pytest.mark.parametrize("key", ["adam_w_mode", "torch_adam", "fused"])
def test_json_flags_must_be_booleans(key: str) -> None:
    with pytest.raises(ValueError, match=rf"{key}='false'\) is invalid; expected True or False"):
        from_deepspeed_config({"type": "Adam", "params": {"lr": 1e-3, key: "false"}}, TinyGPT(n_layer=1))
    with pytest.raises(TypeError, match="takes no 'adam_w_mode'"):
        from_deepspeed_config({"type": "Lamb", "params": {"lr": 1e-3, "adam_w_mode": True}}, TinyGPT(n_layer=1))
