"""SophiaHessian end to end: the Hessian EMA of sophia/sophia_h is refreshed on steps 1, k+1, 2k+1
inside automatic optimization, with the right estimate, and training runs."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_opt.callbacks import SophiaHessian
from lightning_opt.mixin import OptimizerMixin

BETAS = (0.9, 0.95)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, generator=g)
    y = (x @ torch.randn(6, 4, generator=g)).argmax(-1)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


class Clf(OptimizerMixin, pl.LightningModule):
    """A linear classifier; ``sophia_logits``/``sophia_loss`` are the SophiaHessian protocol."""

    def __init__(self, name: str = "sophia", protocol: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        hp = {"betas": BETAS, "bs": 16} if name == "sophia" else {"betas": BETAS}
        self.optimizer = {"name": name, "lr": 0.05, "weight_decay": 0.0, "hparams": hp}
        self.net = nn.Linear(6, 4)
        self.hessians: list[torch.Tensor] = []
        self.losses: list[float] = []
        if protocol:
            self.sophia_logits = lambda batch: self.net(batch[0])
            self.sophia_loss = lambda batch: F.cross_entropy(self.net(batch[0]), batch[1])

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.losses.append(float(loss.detach()))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        opt = self.trainer.optimizers[0]
        self.hessians.append(opt.state[self.net.weight]["hessian"].detach().clone())


def _fit(model: pl.LightningModule, max_steps: int, callbacks=()) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(model, _loader())
    return trainer


def _changed(hessians: list[torch.Tensor]) -> list[bool]:
    prev = torch.zeros_like(hessians[0])
    out = []
    for h in hessians:
        out.append(not torch.equal(h, prev))
        prev = h
    return out


@pytest.mark.parametrize("name", ["sophia", "sophia_h"])
def test_refreshes_every_k_steps_and_trains(name: str) -> None:
    model = Clf(name)
    cb = SophiaHessian(every_n_steps=3)
    _fit(model, 7, [cb])
    assert _changed(model.hessians) == [True, False, False, True, False, False, True]
    assert cb.refreshes == 3
    assert all(torch.isfinite(torch.tensor(model.losses)))
    assert model.losses[-1] < model.losses[0]


def test_gnb_estimate_uses_sampled_labels_and_leaves_the_training_gradient_alone() -> None:
    model = Clf("sophia")
    init = copy.deepcopy(model.net)
    trainer = _fit(model, 1, [SophiaHessian(every_n_steps=5, seed=123)])
    opt = trainer.optimizers[0]
    x, y = next(iter(_loader()))
    # the estimate, computed here by hand: labels drawn from softmax(logits) with the callback's seed
    logits = init(x)
    labels = torch.multinomial(
        torch.softmax(logits.detach(), -1), 1, generator=torch.Generator().manual_seed(123)
    ).squeeze(-1)
    assert not torch.equal(labels, y)  # sampled, not the data labels
    g_hat = torch.autograd.grad(F.cross_entropy(logits, labels), init.weight)[0]
    torch.testing.assert_close(opt.state[model.net.weight]["hessian"], (1 - BETAS[1]) * g_hat * g_hat)
    # the momentum saw the true-label gradient only
    g_true = torch.autograd.grad(F.cross_entropy(init(x), y), init.weight)[0]
    torch.testing.assert_close(opt.state[model.net.weight]["exp_avg"], (1 - BETAS[0]) * g_true)


def test_mixin_adds_the_callback_with_the_paper_period() -> None:
    model = Clf("sophia_h")
    trainer = _fit(model, 2)
    [cb] = [c for c in trainer.callbacks if isinstance(c, SophiaHessian)]
    assert cb.every_n_steps == 10
    assert _changed(model.hessians) == [True, False]


def test_logits_fn_argument_replaces_the_method() -> None:
    model = Clf("sophia", protocol=False)
    calls = []

    def logits_fn(module, batch):
        calls.append(1)
        return module.net(batch[0])

    _fit(model, 3, [SophiaHessian(every_n_steps=2, logits_fn=logits_fn)])
    assert len(calls) == 2 and _changed(model.hessians) == [True, False, True]


@pytest.mark.parametrize(("name", "match"), [("sophia", "has no `sophia_logits"), ("sophia_h", "has no `sophia_loss")])
def test_missing_protocol_fails_at_train_start(name: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _fit(Clf(name, protocol=False), 2)


def test_no_sophia_optimizer_is_an_error() -> None:
    model = Clf("sophia")
    model.optimizer = {"name": "adamw", "lr": 0.01}
    with pytest.raises(ValueError, match=r"found no Sophia optimizer.*AdamW"):
        _fit(model, 1, [SophiaHessian()])


def test_hutchinson_options_change_the_estimate() -> None:
    def first_h(**kw) -> torch.Tensor:
        model = Clf("sophia_h")
        _fit(model, 1, [SophiaHessian(**kw)])
        return model.hessians[0]

    base = first_h()
    assert torch.equal(base, first_h())  # seeded: reproducible
    for kw in ({"distribution": "rademacher"}, {"num_samples": 3}, {"seed": 1}):
        assert not torch.equal(base, first_h(**kw)), kw


def test_generator_state_round_trips() -> None:
    cb = SophiaHessian(seed=5)
    gen = cb._generator(torch.device("cpu"))
    torch.rand(3, generator=gen)
    saved = cb.state_dict()
    expected = torch.rand(4, generator=gen)
    fresh = SophiaHessian(seed=5)
    fresh.load_state_dict(saved)
    assert torch.equal(torch.rand(4, generator=fresh._generator(torch.device("cpu"))), expected)
    assert fresh.refreshes == cb.refreshes


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"every_n_steps": 0}, r"every_n_steps=0"),
        ({"num_samples": 0}, r"num_samples=0"),
        ({"distribution": "uniform"}, r"distribution='uniform'"),
        ({"seed": 1.5}, r"seed=1.5"),
    ],
)
def test_rejects_invalid_arguments(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        SophiaHessian(**kw)


class _Attn(Clf):
    """Self-attention through F.scaled_dot_product_attention, whose fused CPU kernel has no double
    backward: the Hutchinson refresh must still work."""

    def __init__(self) -> None:
        super().__init__("sophia_h", protocol=False)
        self.qkv = nn.Linear(6, 18)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        # (batch, heads, time, head_dim): the 4-D layout that selects the fused CPU kernel
        q, k, v = (t.reshape(2, 8, 2, 3).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(16, 6)
        return self.net(h)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self._logits(batch[0]), batch[1])

    def sophia_loss(self, batch):
        return F.cross_entropy(self._logits(batch[0]), batch[1])


def test_hutchinson_through_fused_attention() -> None:
    model = _Attn()
    _fit(model, 1, [SophiaHessian()])
    assert _changed(model.hessians) == [True]


class _SpikeAt(Clf):
    """The loss of optimizer step ``spike`` is multiplied by 1e4."""

    def __init__(self, spike: int) -> None:
        super().__init__("sophia")
        self.spike = spike
        self.states: dict[str, dict] = {}

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 1e4 if self.trainer.global_step == self.spike else loss

    def _state(self) -> dict:
        opt = self.trainer.optimizers[0]
        return {
            "params": {k: v.detach().clone() for k, v in self.state_dict().items()},
            "optimizer": copy.deepcopy(opt.state_dict()["state"]),
        }

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self.trainer.global_step == self.spike:
            self.states["before"] = self._state()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.trainer.global_step == self.spike + 1:  # global_step counts the skipped batch too
            self.states["after"] = self._state()


def test_a_step_spike_guard_skips_leaves_the_hessian_ema_untouched() -> None:
    from lightning_opt.callbacks import SpikeGuard

    model = _SpikeAt(spike=5)
    guard = SpikeGuard(mode="ratio", threshold=10.0, warmup_steps=3, filename=None)
    # the guard first: it judges after every callback's on_before_optimizer_step, where the estimate is computed
    trainer = _fit(model, 8, [guard, SophiaHessian(every_n_steps=1)])
    assert [s["step"] for s in guard.spikes] == [5]
    before, after = model.states["before"], model.states["after"]
    for k in before["params"]:
        assert torch.equal(before["params"][k], after["params"][k]), k
    assert before["optimizer"].keys() == after["optimizer"].keys()
    for i, state in before["optimizer"].items():
        assert state.keys() == after["optimizer"][i].keys()
        for k, v in state.items():
            assert torch.equal(v, after["optimizer"][i][k]), (i, k)  # hessian included
    # every real step refreshed the EMA, the skipped one did not
    assert _changed(model.hessians) == [True] * 5 + [False] + [True] * 2
    [cb] = [c for c in trainer.callbacks if isinstance(c, SophiaHessian)]
    assert cb.refreshes == 7
    assert not trainer.optimizers[0]._optimizer_step_pre_hooks  # removed at the end of training
