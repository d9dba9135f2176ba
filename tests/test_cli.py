"""The ``lightning-opt`` command: demo (the main job), list, usage, errors."""

from __future__ import annotations

import pytest

from lightning_opt.cli import demo, main


def test_demo_trains_and_lowers_the_validation_loss(tmp_path, capsys) -> None:
    start, end = demo(
        [
            "--trainer.max_steps=30",
            "--trainer.val_check_interval=30",
            "--trainer.limit_val_batches=2",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--data.init_args.max_chars=200000",
            "--model.init_args.optimizer.lr=0.01",
        ]
    )
    out = capsys.readouterr().out
    assert "validation loss at the start" in out and "validation loss at the end" in out
    assert end < start - 1.0, (start, end)


def test_list_prints_every_optimizer(capsys) -> None:
    from lightning_opt import available_optimizers

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in available_optimizers():
        assert name in out


def test_usage_and_unknown_command(capsys) -> None:
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_fit_rejects_a_bad_optimizer_config(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown optimizer 'lino'"):
        main(["fit", "--model=lightning_opt.demo.TinyGPT", "--data=lightning_opt.demo.CharDataModule", "--model.init_args.optimizer.name=lino", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1"])
