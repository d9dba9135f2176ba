"""LRSchedule end to end in a Trainer: lr at every real optimizer step equals the schedule."""

from __future__ import annotations

from typing import ClassVar

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_opt.callbacks import LRSchedule
from lightning_opt.schedules import ScheduleConfig, plateau_init, plateau_update

BASE = {"weight": 0.1, "bias": 0.04}


def _data(n: int = 20) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4, shuffle=False)


class Regression(pl.LightningModule):
    """A Linear model with two param groups (different lrs); records the lrs of each real step."""

    def __init__(self, optimizer: str = "sgd", skip_batches: tuple[int, ...] = ()):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(3, 1)
        self.optimizer_name = optimizer
        self.skip_batches = skip_batches
        self.lrs: list[list[float]] = []
        self.momenta: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        groups = [
            {"params": [self.layer.weight], "lr": BASE["weight"]},
            {"params": [self.layer.bias], "lr": BASE["bias"]},
        ]
        if self.optimizer_name == "adagrad":
            return torch.optim.Adagrad(groups)
        if self.optimizer_name == "adam":
            return torch.optim.Adam(groups)
        if self.optimizer_name == "adam_tensor_lr":
            for g in groups:
                g["lr"] = torch.tensor(g["lr"], dtype=torch.float64)
            return torch.optim.Adam(groups)
        return torch.optim.SGD(groups, momentum=0.9)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        if batch_idx in self.skip_batches:  # a skipped step: the closure runs, the optimizer does not
            optimizer_closure()
            return
        groups = optimizer.param_groups
        self.lrs.append([float(g["lr"]) for g in groups])
        self.momenta.append(groups[0]["betas"][0] if "betas" in groups[0] else groups[0]["momentum"])
        optimizer.step(closure=optimizer_closure)


def _trainer(callbacks, **kw) -> pl.Trainer:
    defaults = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(callbacks=callbacks, **{**defaults, **kw})


def _same(actual, expected) -> None:
    torch.testing.assert_close(
        torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15
    )


def _expected(schedule, steps, momentum: bool = False):
    if momentum:
        return [schedule.momentum(t) for t in steps]
    return [[BASE["weight"] * schedule(t), BASE["bias"] * schedule(t)] for t in steps]


@pytest.mark.parametrize(
    ("kwargs", "optimizer"),
    [
        ({"shape": "cosine", "warmup_steps": 3, "min_lr_ratio": 0.1}, "sgd"),
        ({"shape": "onecycle"}, "sgd"),
        ({"shape": "onecycle", "three_phase": True}, "adam"),
        ({"shape": "wsd", "warmup_ratio": 0.2, "decay_ratio": 0.4, "decay_shape": "1-sqrt"}, "sgd"),
        ({"shape": "polynomial", "warmup_steps": 2, "power": 2.0}, "adam_tensor_lr"),  # a tensor lr is filled in place
    ],
)
def test_lr_per_step_equals_schedule_with_gradient_accumulation(kwargs, optimizer):
    model, cb = Regression(optimizer), LRSchedule(**kwargs)
    # 20 samples / 4 = 5 batches an epoch, 2 per step: 10 steps over 4 epochs
    _trainer([cb], max_steps=10, accumulate_grad_batches=2).fit(model, _data())
    schedule = ScheduleConfig(**kwargs).resolve(10)  # the run length came from estimated_stepping_batches
    assert len(model.lrs) == 10 and cb.step == 10 and cb.schedule == schedule
    _same(model.lrs, _expected(schedule, range(10)))
    if kwargs["shape"] == "onecycle":
        _same(model.momenta, _expected(schedule, range(10), momentum=True))
    else:
        assert model.momenta == [0.9] * 10


def test_skipped_steps_do_not_advance_the_schedule():
    model, cb = Regression(skip_batches=(1, 3)), LRSchedule("linear", warmup_steps=2, total_steps=12)
    _trainer([cb], max_epochs=2).fit(model, _data())  # 10 batches, 4 skipped -> 6 real steps
    assert cb.steps == [6]
    _same(model.lrs, _expected(ScheduleConfig("linear", warmup_steps=2).resolve(12), range(6)))


class InfLossAt(Regression):
    """Batch 2's loss is inf, so the GradScaler finds inf gradients and skips that optimizer step."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if batch_idx == 2 else loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        self.lrs.append([float(g["lr"]) for g in optimizer.param_groups])
        before = self.layer.weight.detach().clone()
        optimizer.step(closure=optimizer_closure)
        self.stepped = [*getattr(self, "stepped", []), not torch.equal(before, self.layer.weight)]


def test_grad_scaler_inf_skip_does_not_advance_the_schedule():
    from lightning.pytorch.plugins import MixedPrecision

    model, cb = InfLossAt(), LRSchedule("linear", total_steps=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    _trainer([cb], max_epochs=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]).fit(model, _data())
    assert model.stepped == [True, True, False, True, True] and cb.steps == [4]
    s = ScheduleConfig("linear").resolve(10)
    _same(model.lrs, _expected(s, [0, 1, 2, 2, 3]))


def test_lr_of_every_group_is_logged():
    model, cb = Regression(), LRSchedule("linear", total_steps=5)
    trainer = _trainer([cb], max_steps=4)
    trainer.fit(model, _data())
    m = trainer.callback_metrics
    assert float(m["lr-SGD/pg1"]) == pytest.approx(0.1 * 2 / 5) and float(m["lr-SGD/pg2"]) == pytest.approx(
        0.04 * 2 / 5
    )
    model, trainer = Regression(), _trainer([LRSchedule("linear", total_steps=5, log_lr=False)], max_steps=4)
    trainer.fit(model, _data())
    assert "lr-SGD/pg1" not in trainer.callback_metrics


def _fit(cb, max_steps, ckpt_in=None, ckpt_out=None):
    model = Regression()
    trainer = _trainer([cb], max_steps=max_steps)
    # one batch an epoch: Lightning resumes a run stopped by max_steps at the next epoch, so the data a
    # resumed run sees matches the uninterrupted run's only when every epoch is the same batch
    trainer.fit(model, _data(4), ckpt_path=ckpt_in)
    if ckpt_out:
        trainer.save_checkpoint(ckpt_out)
    return model


def test_resume_equals_uninterrupted(tmp_path):
    kwargs = {"shape": "cosine", "warmup_steps": 2, "total_steps": 10}  # the first half stops early at 5
    straight = _fit(LRSchedule(**kwargs), 10)
    _fit(LRSchedule(**kwargs), 5, ckpt_out=tmp_path / "half.ckpt")
    resumed_cb = LRSchedule(**kwargs)
    resumed = _fit(resumed_cb, 10, ckpt_in=tmp_path / "half.ckpt")
    assert resumed.lrs == straight.lrs[5:]  # recomputed from the step: bit-identical
    assert resumed_cb.state_dict() == {"step": 10, "steps": [10]}
    torch.testing.assert_close(resumed.layer.weight, straight.layer.weight, rtol=0, atol=0)


def test_wsd_resumes_with_a_longer_run_and_with_decay_start_now(tmp_path):
    kwargs = {"shape": "wsd", "warmup_steps": 2, "decay_steps": 3}
    _fit(LRSchedule(**kwargs), 5, ckpt_out=tmp_path / "stable.ckpt")  # planned run: 10 steps
    longer = _fit(LRSchedule(**kwargs), 15, ckpt_in=tmp_path / "stable.ckpt")
    _same(longer.lrs, _expected(ScheduleConfig(**kwargs).resolve(15), range(5, 15)))
    assert [lr[0] for lr in longer.lrs[:7]] == [0.1] * 7  # the stable phase grew to step 12

    cb = LRSchedule(**kwargs, decay_start="now")
    now = _fit(cb, 8, ckpt_in=tmp_path / "stable.ckpt", ckpt_out=tmp_path / "decaying.ckpt")
    expected = ScheduleConfig(**kwargs, decay_start=5).resolve(8)
    _same(now.lrs, _expected(expected, range(5, 8)))
    assert now.lrs[0][0] == 0.1 and now.lrs[1][0] < 0.1 and cb.state_dict()["decay_start"] == 5
    # resuming the decaying run keeps the decay where it started
    again = _fit(LRSchedule(**kwargs, decay_start="now"), 9, ckpt_in=tmp_path / "decaying.ckpt")
    _same(again.lrs, _expected(ScheduleConfig(**kwargs, decay_start=5).resolve(9), [8]))


class TwoOptimizers(pl.LightningModule):
    """Manual optimization: optimizer A steps every batch, optimizer B every other batch."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = nn.Linear(3, 1), nn.Linear(3, 1)
        self.lrs: dict[str, list[float]] = {"a": [], "b": []}

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        for name, opt, layer in (("a", opt_a, self.a), ("b", opt_b, self.b)):
            if name == "b" and batch_idx % 2:
                continue
            self.lrs[name].append(opt.param_groups[0]["lr"])
            opt.zero_grad()
            self.manual_backward(nn.functional.mse_loss(layer(x), y))
            opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.Adam(self.b.parameters(), lr=0.01)


def test_several_optimizers_each_advance_on_their_own_steps():
    model, cb = TwoOptimizers(), LRSchedule("linear", total_steps=10)
    trainer = _trainer([cb], max_epochs=2)
    trainer.fit(model, _data())
    s = ScheduleConfig("linear").resolve(10)
    assert cb.steps == [10, 6]
    assert {"lr-SGD", "lr-Adam"} <= set(trainer.callback_metrics)  # every optimizer's lr is logged
    assert model.lrs["a"] == pytest.approx([0.1 * s(t) for t in range(10)], abs=1e-15)
    assert model.lrs["b"] == pytest.approx([0.01 * s(t) for t in range(6)], abs=1e-15)


class WithValidation(Regression):
    METRICS: ClassVar[list[float]] = [1.0, 0.875, 0.9375, 0.96875, 0.984375, 0.9921875, 0.5]  # exact in float32

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.METRICS[self.current_epoch])

    def on_train_epoch_end(self):
        self.epoch_lrs.append(self.optimizers().param_groups[0]["lr"])


def test_plateau_follows_the_logged_metric_like_reduce_lr_on_plateau():
    model = WithValidation()
    model.epoch_lrs = []
    cb = LRSchedule("plateau", patience=1, factor=0.5, warmup_steps=2)
    _trainer([cb], max_epochs=6, num_sanity_val_steps=0).fit(model, _data(), _data(4))
    opt = torch.optim.SGD([torch.zeros(1)], lr=0.1)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1, factor=0.5)
    expected = []
    for m in WithValidation.METRICS[:6]:
        ref.step(m)
        expected.append(opt.param_groups[0]["lr"])
    after_epoch = [lrs[0] for lrs in model.lrs[5::5]] + [0.1 * cb.plateau["scale"]]
    assert after_epoch == pytest.approx(expected, abs=1e-15)
    assert model.lrs[0][0] == 0.0 and model.lrs[1][0] == 0.05  # the warmup
    assert cb.state_dict()["plateau"] == plateau_update_sequence(cb.config, WithValidation.METRICS[:6])


def plateau_update_sequence(config, metrics):
    state = plateau_init(config)
    for m in metrics:
        state = plateau_update(config, state, m)
    return state


def test_plateau_without_the_metric_says_what_was_logged():
    with pytest.raises(ValueError, match="monitors 'val_loss', which was not logged"):
        _trainer([LRSchedule("plateau")], max_epochs=1).fit(Regression(), _data())


def test_errors_at_construction_and_at_start():
    with pytest.raises(ValueError, match="expected one of constant, linear, cosine"):
        LRSchedule("cosinus")
    with pytest.raises(ValueError, match="warmup is longer than the run"):
        LRSchedule(warmup_steps=20, total_steps=10)
    with pytest.raises(ValueError, match="decay_start='now'"):
        LRSchedule("cosine", decay_start="now")
    with pytest.raises(ValueError, match="warmup is longer than the run"):  # run length from the trainer
        _trainer([LRSchedule(warmup_steps=20)], max_steps=5).fit(Regression(), _data())
    with pytest.raises(ValueError, match="neither: pass cycle_momentum=False"):
        _trainer([LRSchedule("onecycle")], max_steps=5).fit(Regression("adagrad"), _data())

    class WithTorchScheduler(Regression):
        def configure_optimizers(self):
            opt = super().configure_optimizers()
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 2)]

    with pytest.raises(ValueError, match="also returned a torch scheduler"):
        _trainer([LRSchedule()], max_steps=5).fit(WithTorchScheduler(), _data())


def test_state_dict_round_trips_and_reads_old_checkpoints():
    cb = LRSchedule("plateau")
    cb.steps, cb.plateau = [7, 3], {"best": 0.5, "num_bad": 2, "cooldown_counter": 0, "scale": 0.1}
    fresh = LRSchedule("plateau")
    fresh.load_state_dict(cb.state_dict())
    assert fresh.state_dict() == cb.state_dict() == {"step": 7, "steps": [7, 3], "plateau": cb.plateau}
    old = LRSchedule()
    old.load_state_dict({"step": 4})
    assert old.steps == [4] and old.step == 4


def test_gan_demo_builds_two_registry_optimizers_that_the_schedule_drives():
    from lightning_opt.demo.gan import RingGaussians, ToyGAN

    model, cb = ToyGAN(), LRSchedule("cosine", warmup_steps=1, total_steps=4)
    _trainer([cb], max_epochs=1, limit_train_batches=3).fit(model, RingGaussians(samples=512))
    opt_g, opt_d = (o for o in cb._optimizers)
    assert type(opt_g).__name__ == type(opt_d).__name__ == "Adam"
    assert opt_g.param_groups[0]["betas"] == (0.5, 0.999) and opt_d.param_groups[0]["betas"] == (0.5, 0.999)
    gen = {id(p) for g in opt_g.param_groups for p in g["params"]}
    assert gen == {id(p) for p in model.generator.parameters()}  # each optimizer over its own network
    assert cb.steps == [3, 3]
    assert opt_g.param_groups[0]["lr"] == pytest.approx(
        2e-4 * ScheduleConfig("cosine", warmup_steps=1).resolve(4)(3), abs=1e-18
    )


def test_plateau_monitor_and_eps_are_read():
    class LogsAcc(WithValidation):
        def validation_step(self, batch, batch_idx):
            self.log("val_acc", self.METRICS[self.current_epoch])

    model = LogsAcc()
    model.epoch_lrs = []
    # mode=max: accuracy 1.0, then 0.875 and 0.9375 never beat it, so patience=0 halves twice
    cb = LRSchedule("plateau", monitor="val_acc", mode="max", patience=0, factor=0.5)
    _trainer([cb], max_epochs=3, num_sanity_val_steps=0).fit(model, _data(), _data(4))
    assert cb.plateau["best"] == 1.0 and cb.plateau["scale"] == 0.25  # 0.875 and 0.9375 never beat 1.0
    # eps: a reduction smaller than eps (in multiplier units) is not applied, as torch's
    for eps, scale in ((0.6, 1.0), (None, 0.5)):
        config = ScheduleConfig("plateau", patience=0, factor=0.5, eps=eps)
        state = plateau_update(config, plateau_update(config, plateau_init(config), 1.0), 2.0)
        assert state["scale"] == scale


def test_loading_state_mid_run_applies_the_restored_step():
    model, cb = Regression(), LRSchedule("linear", total_steps=10)
    _trainer([cb], max_steps=6).fit(model, _data())
    groups = cb._optimizers[0].param_groups
    assert groups[0]["lr"] == pytest.approx(0.1 * 0.4)
    cb.load_state_dict({"step": 2, "steps": [2]})  # e.g. a rollback to the snapshot of step 2
    assert groups[0]["lr"] == pytest.approx(0.1 * 0.8) and groups[1]["lr"] == pytest.approx(0.04 * 0.8)


def test_layer_decay_and_lr_multiplier_ratios_survive_with_the_mixin():
    from lightning_opt.mixin import OptimizerConfig, OptimizerMixin

    class Net(OptimizerMixin, pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.optimizer = OptimizerConfig("adamw", lr=1e-2, layer_decay=0.5, lr_multipliers={"^head": 10.0})
            self.layers, self.head = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)), nn.Linear(3, 1)
            self.ratios: list[list[float]] = []

        def training_step(self, batch, batch_idx):
            groups = self.trainer.optimizers[0].param_groups
            self.ratios.append([g["lr"] / g["lr_scale"] for g in groups])
            return nn.functional.mse_loss(self.head(self.layers(batch[0])), batch[1])

    model, cb = Net(), LRSchedule("cosine", warmup_steps=1, total_steps=5)
    _trainer([cb], max_steps=5).fit(model, _data())
    scales = {g["lr_scale"] for g in cb._optimizers[0].param_groups}
    assert len(scales) > 2  # layer decay and the head multiplier made different group lrs
    s = ScheduleConfig("cosine", warmup_steps=1).resolve(5)
    for t, row in enumerate(model.ratios):  # every group: its own lr times the same multiplier
        assert row == pytest.approx([1e-2 * s(t)] * len(row), rel=1e-12, abs=1e-18)


def test_one_instance_reused_for_a_second_fit_starts_over():
    cb = LRSchedule("cosine", warmup_steps=2, total_steps=8)
    first = _fit(cb, 8)
    second = _fit(cb, 8)  # a fresh model, the same callback: the schedule starts at step 0 again
    assert second.lrs == first.lrs and cb.steps == [8]

    cb = LRSchedule("wsd", decay_steps=3, decay_start="now")
    _fit(cb, 5)
    assert cb.state_dict()["decay_start"] == 0  # resolved where the first fit started
    cb.resolved_decay_start = 2  # as if resumed: a second fit must not keep it
    again = _fit(cb, 5)
    assert cb.state_dict()["decay_start"] == 0
    _same(again.lrs, _expected(ScheduleConfig("wsd", decay_steps=3, decay_start=0).resolve(5), range(5)))

    model = WithValidation()
    model.epoch_lrs = []
    cb = LRSchedule("plateau", patience=0, factor=0.5)
    _trainer([cb], max_epochs=3, num_sanity_val_steps=0).fit(model, _data(), _data(4))
    assert cb.plateau["scale"] == 0.5
    model = WithValidation()
    model.epoch_lrs = []
    _trainer([cb], max_epochs=1, num_sanity_val_steps=0).fit(model, _data(), _data(4))
    assert cb.plateau == plateau_update_sequence(cb.config, WithValidation.METRICS[:1])  # not the old 0.5
    assert [lrs[0] for lrs in model.lrs] == [0.1] * 5


class ValidatesEveryOtherEpoch(Regression):
    """Logs METRICS[k] at its k-th validation; the sanity check logs a best-ever -1 that must not count."""

    def __init__(self):
        super().__init__()
        self.validations = 0
        self.epoch_lrs: list[float] = []

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", -1.0 if self.trainer.sanity_checking else WithValidation.METRICS[self.validations])

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.validations += 1

    def on_train_epoch_start(self):
        self.epoch_lrs.append(self.optimizers().param_groups[0]["lr"])


def test_plateau_steps_once_per_validation_with_check_val_every_n_epoch():
    model = ValidatesEveryOtherEpoch()
    cb = LRSchedule("plateau", patience=1, factor=0.5)
    _trainer([cb], max_epochs=8, check_val_every_n_epoch=2).fit(model, _data(), _data(4))
    assert model.validations == 4  # after epochs 1, 3, 5, 7
    opt = torch.optim.SGD([torch.zeros(1)], lr=0.1)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1, factor=0.5)
    expected = []  # the lr of each epoch: changed only by the validations before it
    for epoch in range(8):
        expected.append(opt.param_groups[0]["lr"])
        if epoch % 2 == 1:
            ref.step(WithValidation.METRICS[epoch // 2])
    assert model.epoch_lrs == pytest.approx(expected, abs=1e-15)
    assert expected[-1] == 0.1 and opt.param_groups[0]["lr"] == 0.05  # the reduction came at the last one
    assert cb.plateau == plateau_update_sequence(cb.config, WithValidation.METRICS[:4])
