"""Lightning's ``Tuner.lr_find`` works on a module that uses ``OptimizerMixin`` (no second LR finder)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.tuner import Tuner
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_opt.callbacks import LRSchedule
from lightning_opt.mixin import OptimizerConfig, OptimizerMixin


class TinyRegression(OptimizerMixin, pl.LightningModule):
    def __init__(self, optimizer: OptimizerConfig | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.optimizer = optimizer or OptimizerConfig("adamw", lr=1e-3)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.seen_lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen_lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return nn.functional.mse_loss(self.net(x), y)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 4, generator=g)
        return DataLoader(TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])), batch_size=8)


def _trainer(**kw) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def test_lr_find_sweeps_the_mixin_optimizer_and_the_suggestion_trains():
    model = TinyRegression()
    trainer = _trainer(max_steps=10, callbacks=[LRSchedule("cosine", warmup_steps=2)])
    finder = Tuner(trainer).lr_find(model, min_lr=1e-5, max_lr=1.0, num_training=30, update_attr=False)
    swept = finder.results["lr"]
    assert len(swept) == 30 and swept[0] < 2e-5 and swept[-1] > 0.5  # the mixin's optimizer was swept
    assert model.seen_lrs[:30] == swept  # the lr the finder set is the lr the optimizer used
    suggestion = finder.suggestion()
    assert suggestion is not None and 1e-5 <= suggestion <= 1.0
    model.optimizer.lr = suggestion  # the mixin reads its OptimizerConfig at configure_optimizers
    model.seen_lrs.clear()
    trainer.fit(model)
    # the real run starts from the suggestion, scheduled by LRSchedule (warmup from 0)
    assert model.seen_lrs[0] == 0.0 and model.seen_lrs[2] == suggestion
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == suggestion
