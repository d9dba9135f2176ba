"""from_deepspeed_config: DeepSpeed optimizer blocks, "auto" values, file paths, errors."""

from __future__ import annotations

import json

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
        from_deepspeed_config(sched, TinyGPT(n_layer=1), warmup_num_steps=10, **auto)
    opt, schedule = from_deepspeed_config(sched, TinyGPT(n_layer=1), with_schedule=True, warmup_num_steps=10, **auto)
    assert schedule is not None
