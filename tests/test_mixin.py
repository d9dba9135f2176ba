"""OptimizerMixin and OptimizerConfig: built from config, validated at construction, used by a Trainer."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_opt import OptimizerConfig, OptimizerMixin
from lightning_opt.demo import TinyGPT
from lightning_opt.optim import registry


def test_config_builds_the_named_optimizer_with_groups() -> None:
    model = TinyGPT(n_layer=2, optimizer=OptimizerConfig(name="adamw", lr=3e-3, weight_decay=0.1, layer_decay=0.5, hparams={"betas": [0.9, 0.95]}))
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.95)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert scales == [0.125, 0.25, 0.5, 1.0]
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(3e-3 * g["lr_scale"])


def test_lr_none_takes_the_algorithm_default() -> None:
    assert OptimizerConfig(name="nadam").resolved_lr() == 2e-3
    opt = TinyGPT(n_layer=1, optimizer=OptimizerConfig(name="sgd")).configure_optimizers()
    assert opt.defaults["lr"] == 1e-2


def test_mixin_accepts_a_name_or_a_dict() -> None:
    model = TinyGPT(n_layer=1)
    model.optimizer = "rmsprop"
    assert isinstance(model.configure_optimizers(), torch.optim.RMSprop)
    model.optimizer = {"name": "sgd_nesterov", "lr": 0.05}
    opt = model.configure_optimizers()
    assert opt.defaults["nesterov"] is True and opt.defaults["lr"] == 0.05


def test_lr_multipliers_from_config() -> None:
    opt = TinyGPT(n_layer=1, optimizer=OptimizerConfig(lr=1e-3, lr_multipliers={"lm_head": 10.0})).configure_optimizers()
    head = [g for g in opt.param_groups if "lm_head.weight" in g["param_names"]][0]
    assert head["lr"] == pytest.approx(1e-2) and len(head["param_names"]) == 1


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"name": "lino"}, ValueError, "unknown optimizer 'lino'"),
        ({"name": "sgd", "hparams": {"eps": 1e-8}}, TypeError, "sgd takes no 'eps'"),
        ({"lr": -1.0}, ValueError, "lr=-1.0"),
        ({"layer_decay": 0.0}, ValueError, "layer_decay"),
        ({"no_decay": ["("]}, ValueError, "not a valid regex"),
        ({"hparams": {"betas": [0.9, 1.5]}}, ValueError, "betas"),
    ],
)
def test_config_errors_at_construction(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        OptimizerConfig(**kwargs)


def test_pattern_matching_nothing_fails_when_built() -> None:
    model = TinyGPT(n_layer=1, optimizer=OptimizerConfig(no_decay=["nothing_matches"]))
    with pytest.raises(ValueError, match="match no trainable parameter"):
        model.configure_optimizers()


def test_trainer_fits_with_the_mixin(tmp_path) -> None:
    from lightning_opt.demo import CharDataModule

    model = TinyGPT(n_layer=1, n_embd=32, optimizer=OptimizerConfig(name="adamw", lr=1e-2, weight_decay=0.1))
    data = CharDataModule(batch_size=8, max_chars=50_000, train_samples=64, val_samples=8)
    before = model.lm_head.weight.detach().clone()
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=1)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 3
    assert not torch.equal(before, model.lm_head.weight)


class _Marker(Callback):
    pass


def test_configure_callbacks_adds_what_the_algorithm_needs(monkeypatch) -> None:
    info = registry.OptimInfo(name="needs_marker", cls=torch.optim.SGD, description="test", callbacks=("tests.test_mixin:_Marker",))
    monkeypatch.setitem(registry._REGISTRY, "needs_marker", info)
    model = TinyGPT(n_layer=1, optimizer=OptimizerConfig(name="needs_marker", lr=0.1))
    added = model.configure_callbacks()
    assert len(added) == 1 and isinstance(added[0], _Marker)
    assert TinyGPT(n_layer=1).configure_callbacks() == []


def test_lr_attribute_reads_and_writes_the_config() -> None:
    model = TinyGPT(n_layer=1, optimizer=OptimizerConfig(name="sgd"))
    assert model.lr == 1e-2
    model.lr = 0.3
    assert model.optimizer.name == "sgd" and model.configure_optimizers().defaults["lr"] == 0.3
    with pytest.raises(ValueError, match="lr=-1"):
        model.lr = -1.0


def test_lr_find_updates_the_config(tmp_path) -> None:
    from lightning.pytorch.tuner import Tuner

    from lightning_opt.demo import CharDataModule

    model = TinyGPT(n_layer=1, n_embd=32, optimizer=OptimizerConfig(name="adamw", lr=1e-3))
    data = CharDataModule(batch_size=8, max_chars=50_000, train_samples=256, val_samples=8)
    trainer = L.Trainer(max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    finder = Tuner(trainer).lr_find(model, datamodule=data, num_training=20, update_attr=True)
    assert finder.suggestion() is not None
    assert model.optimizer.lr == finder.suggestion() != 1e-3


def test_checkpoint_resume_equals_a_straight_run(tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_opt.demo import CharDataModule

    def run(ckpt: str | None = None) -> TinyGPT:
        L.seed_everything(0)
        model = TinyGPT(n_layer=1, n_embd=32, optimizer=OptimizerConfig(name="adamw", lr=1e-2, weight_decay=0.1, layer_decay=0.5))
        # one batch an epoch: Lightning restarts a plain DataLoader from its first batch on resume
        data = CharDataModule(batch_size=8, max_chars=50_000, train_samples=8, val_samples=8)
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
        trainer = L.Trainer(max_steps=4, logger=False, callbacks=[saver], enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0)
        trainer.fit(model, datamodule=data, ckpt_path=ckpt)
        return model

    straight = run()
    resumed = run(ckpt=str(tmp_path / "ckpt" / "epoch=1-step=2.ckpt"))
    assert resumed.optimizer == straight.optimizer
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
