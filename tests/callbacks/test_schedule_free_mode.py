"""ScheduleFreeMode end to end in a Trainer: validation at x, training at y, checkpoints at x that
resume bit for bit."""

from __future__ import annotations

import glob
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_opt.callbacks import ScheduleFreeMode
from lightning_opt.mixin import OptimizerMixin

BETA = 0.9


def _loader(n: int = 16, batch_size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.randn(4, 1, generator=g) + 0.1
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class Reg(OptimizerMixin, pl.LightningModule):
    def __init__(self, optimizer: dict | str | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.optimizer = optimizer or {"name": "schedule_free_adamw", "lr": 0.05, "hparams": {"betas": (BETA, 0.999)}}
        self.net = nn.Linear(4, 1)
        self.events: list[tuple] = []

    def _snap(self) -> torch.Tensor:
        return self.net.weight.detach().clone().double()

    def _opt(self):
        return self.trainer.optimizers[0]

    def _z(self) -> torch.Tensor:
        z = self._opt().state[self.net.weight].get("z", torch.zeros(()))
        return z.detach().clone().double()

    def training_step(self, batch, batch_idx):
        self.events.append(("train", self._snap(), self._opt().param_groups[0].get("train_mode")))
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        self.events.append(("val", self._snap(), self._opt().param_groups[0].get("train_mode")))
        x, y = batch
        self.log("val_loss", F.mse_loss(self.net(x), y))

    def test_step(self, batch, batch_idx):
        self.events.append(("test", self._snap(), self._opt().param_groups[0].get("train_mode")))

    def predict_step(self, batch, batch_idx):
        self.events.append(("predict", self._snap(), self._opt().param_groups[0].get("train_mode")))
        return self.net(batch[0])


class _RecordY(pl.Callback):
    # a callback, not the module hook: callbacks run before the module's on_train_batch_end and
    # Lightning orders ModelCheckpoint last, so this sees the parameters before any save
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.events.append(("y", pl_module._snap(), pl_module._z()))


def _trainer(**kw) -> pl.Trainer:
    kw["callbacks"] = [_RecordY(), *kw.get("callbacks", [])]
    kw = {
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        **kw,
    }
    kw.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in kw.get("callbacks", [])))
    return pl.Trainer(**kw)


def _x_from(y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    # x = (y - (1 - beta) z) / beta, computed independently of the optimizer's lerp
    return (y - (1 - BETA) * z) / BETA


def test_validation_sees_x_and_training_resumes_at_y() -> None:
    model = Reg()
    trainer = _trainer(max_steps=6, check_val_every_n_epoch=2, limit_val_batches=1)
    trainer.fit(model, _loader(), _loader())
    assert any(isinstance(cb, ScheduleFreeMode) for cb in trainer.callbacks)  # added by the mixin
    ev = model.events
    vals = [i for i, e in enumerate(ev) if e[0] == "val"]
    assert len(vals) == 3
    for i in vals:
        _, y, z = ev[i - 1]
        assert ev[i - 1][0] == "y"
        _, w_val, train_mode = ev[i]
        assert train_mode is False
        assert not torch.allclose(w_val, y, atol=1e-4)  # x differs from y, so the check means something
        torch.testing.assert_close(w_val, _x_from(y, z), rtol=1e-5, atol=1e-6)
        if i + 1 < len(ev):  # the next training step runs at y again
            kind, w_train, train_mode = ev[i + 1]
            assert kind == "train" and train_mode is True
            torch.testing.assert_close(w_train, y, rtol=1e-5, atol=1e-6)
    # after fit the model holds x
    opt = trainer.optimizers[0]
    assert opt.param_groups[0]["train_mode"] is False
    _, y_last, z_last = [e for e in ev if e[0] == "y"][-1]
    torch.testing.assert_close(model._snap(), _x_from(y_last, z_last), rtol=1e-5, atol=1e-6)


def test_test_and_predict_run_at_x() -> None:
    model = Reg()
    trainer = _trainer(max_steps=3, limit_val_batches=0)
    trainer.fit(model, _loader())
    opt = trainer.optimizers[0]
    opt.train()  # e.g. the user stepped by hand after fit
    assert opt.param_groups[0]["train_mode"] is True
    trainer.test(model, _loader(), verbose=False)
    assert model.events[-1][0] == "test" and model.events[-1][2] is False
    opt.train()
    trainer.predict(model, _loader())
    assert model.events[-1][0] == "predict" and model.events[-1][2] is False


def _fit_with_checkpoints(tmp: str, max_steps: int, ckpt_path: str | None = None) -> Reg:
    model = Reg()
    ckpt = ModelCheckpoint(dirpath=tmp, every_n_train_steps=4, save_top_k=-1)
    trainer = _trainer(max_steps=max_steps, limit_val_batches=0, callbacks=[ckpt])
    trainer.fit(model, _loader(), ckpt_path=ckpt_path)
    model.trainer_ = trainer
    return model


def test_checkpoint_holds_x_and_resumes_exactly(tmp_path) -> None:
    straight = _fit_with_checkpoints(str(tmp_path / "a"), max_steps=10)
    [path] = glob.glob(os.path.join(tmp_path, "a", "*step=4.ckpt"))
    ckpt = torch.load(path, weights_only=False)
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert group["train_mode"] is False and group["k"] == 4
    # the saved weights are x: compare with y recorded after step 4 and the saved z
    ys = [e for e in straight.events if e[0] == "y"]
    y4, z4 = ys[3][1], ys[3][2]
    saved_w = ckpt["state_dict"]["net.weight"].double()
    torch.testing.assert_close(saved_w, _x_from(y4, z4), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(saved_w, y4, atol=1e-4)

    resumed = _fit_with_checkpoints(str(tmp_path / "b"), max_steps=10, ckpt_path=path)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    oa, ob = straight.trainer_.optimizers[0], resumed.trainer_.optimizers[0]
    assert oa.param_groups[0]["k"] == ob.param_groups[0]["k"] == 10
    assert torch.equal(oa.state[straight.net.weight]["z"], ob.state[resumed.net.weight]["z"])


def test_leaves_other_optimizers_alone() -> None:
    model = Reg({"name": "adamw", "lr": 0.01})
    trainer = _trainer(max_steps=2, limit_val_batches=1, callbacks=[ScheduleFreeMode()])
    trainer.fit(model, _loader(), _loader())
    assert "train_mode" not in trainer.optimizers[0].param_groups[0]


def test_warns_about_weights_only_checkpoints(tmp_path) -> None:
    model = Reg()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_weights_only=True)
    trainer = _trainer(max_steps=1, limit_val_batches=0, callbacks=[ckpt])
    with pytest.warns(UserWarning, match="save_weights_only=True"):
        trainer.fit(model, _loader())
