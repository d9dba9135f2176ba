"""Lightning's ModelParallelStrategy (FSDP2) on 2 CPU ranks: our callbacks and checkpoints.

Each rank trains on the same full batch (``use_distributed_sampler=False``), so the averaged
gradient equals the 1-process gradient bit for bit and the sharded run must equal a plain
1-process Trainer run: the callbacks (``LRSchedule``, ``ScheduleFreeMode``, ``SophiaHessian``,
``GradientMonitor``, ``SpikeGuard`` skipping and rolling back a spike) and the resume from a
Lightning checkpoint, both sharded (``save_distributed_checkpoint=True``) and full (``False``,
which also loads into a 1-process run), for every name that runs on shards.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, Dataset

from lightning_opt import available_optimizers, build_optimizer
from lightning_opt.callbacks import GradientMonitor, LRSchedule, ScheduleFreeMode, SophiaHessian, SpikeGuard
from tests.distributed._harness import UnevenNet, fsdp2_shard, lightning_env, run_ranks
from tests.distributed.test_every_name import HPARAMS, OWNER_COMPUTE, REDUCES, REFUSES

STEPS = 4
SPIKE_STEP = 6  # the batch of this step is scaled by 1e3 in the spike runs


class _Batches(Dataset):
    """One 8-sample batch per epoch (the same every epoch, so a resume sees the same data)."""

    def __init__(self) -> None:
        self.x = torch.randn(8, 12, generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x


class _Module(pl.LightningModule):
    def __init__(self, name: str, hparams: dict | None = None, spike_at: int | None = None) -> None:
        super().__init__()
        self.net = UnevenNet()
        self.name, self.opt_hparams, self.spike_at = name, hparams or {}, spike_at
        self.sharded = False

    def configure_model(self) -> None:
        if self.sharded:
            fsdp2_shard(self.net)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = batch
        if self.spike_at is not None and self.global_step == self.spike_at:
            x = x * 1e3
        return (self.net(x) ** 2).mean()

    def sophia_logits(self, batch: torch.Tensor) -> torch.Tensor:
        return self.net(batch)  # 12 "classes" per sample, for SophiaG's sampled labels

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val", (self.net(batch) ** 2).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = {**HPARAMS.get(self.name, {}), **self.opt_hparams}
        return build_optimizer(self.net, self.name, lr=1e-3, weight_decay=0.01, **hp)


def _trainer(root: str, world_size: int, callbacks: list, max_steps: int, **kw) -> pl.Trainer:
    strategy = ModelParallelStrategy(data_parallel_size=world_size, tensor_parallel_size=1, **kw) if world_size > 1 else "auto"
    return pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=world_size,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        check_val_every_n_epoch=2,
        num_sanity_val_steps=0,
        default_root_dir=root,
    )


def _full(module: _Module) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in module.net.named_parameters()
    }


def _loader() -> DataLoader:
    return DataLoader(_Batches(), batch_size=None)


SCENARIOS = {
    "schedule_free": ("schedule_free_adamw", {}, None, lambda: [ScheduleFreeMode(), GradientMonitor(log_every_n_steps=1)]),
    "lr_schedule": ("lamb", {}, None, lambda: [LRSchedule("cosine", warmup_steps=2, total_steps=STEPS)]),
    "sophia": ("sophia", {}, None, lambda: [SophiaHessian(every_n_steps=2)]),
    "spike_skip": ("adamw", {}, SPIKE_STEP, lambda: [SpikeGuard(action="skip", warmup_steps=3, filename=None)]),
    "spike_rollback": (
        "lion",
        {},
        SPIKE_STEP,
        lambda: [SpikeGuard(action="rollback", warmup_steps=3, snapshot_every_n_steps=2, filename=None)],
    ),
}


def _run(scenario: str, root: str, world_size: int) -> dict:
    name, hp, spike_at, callbacks = SCENARIOS[scenario]
    module = _Module(name, hp, spike_at)
    module.sharded = world_size > 1
    cbs = callbacks()
    steps = SPIKE_STEP + 2 if spike_at is not None else STEPS
    trainer = _trainer(root, world_size, cbs, steps)
    trainer.fit(module, _loader(), _loader())
    out: dict = {"params": _full(module), "lr": trainer.optimizers[0].param_groups[0]["lr"]}
    for cb in cbs:
        if isinstance(cb, GradientMonitor):
            out["grad_metrics"] = dict(cb.metrics)
        if isinstance(cb, SpikeGuard):
            out["spikes"] = [(s["step"], s["action"]) for s in cb.spikes]
    return out


def _callbacks_rank(rank: int, world_size: int, root: str) -> dict:
    lightning_env(rank, world_size)
    out = {s: _run(s, f"{root}/{s}", world_size) for s in SCENARIOS}
    module = _Module("sophia_h")
    module.sharded = True
    module.sophia_loss = lambda batch: (module.net(batch) ** 2).mean()
    try:  # Hutchinson's Hessian-vector products cannot reach FSDP2 shards: refused when training starts
        _trainer(f"{root}/sophia_h", world_size, [SophiaHessian(every_n_steps=2)], STEPS).fit(module, _loader())
    except RuntimeError as err:
        out["sophia_h"] = str(err)
    return out


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float, what: str) -> None:
    for k, v in b.items():
        err = ((a[k] - v).abs().max() / v.abs().max().clamp_min(1e-30)).item()
        assert err <= tol, f"{what}: {k} differs by {err:.2e}"


def test_callbacks_under_fsdp2_equal_one_process(tmp_path) -> None:
    sharded = run_ranks(_callbacks_rank, str(tmp_path / "dist"))
    for scenario in SCENARIOS:
        want = _run(scenario, str(tmp_path / "single" / scenario), 1)
        for rank in (0, 1):
            got = sharded[rank][scenario]
            _close(got["params"], want["params"], 1e-6, f"{scenario} rank {rank}")
            assert math.isclose(got["lr"], want["lr"], rel_tol=1e-12), scenario
            if "grad_metrics" in want:
                assert got["grad_metrics"].keys() == want["grad_metrics"].keys()
                for k, v in want["grad_metrics"].items():
                    assert math.isclose(got["grad_metrics"][k], v, rel_tol=1e-5, abs_tol=1e-9), (scenario, k)
            if "spikes" in want:
                assert got["spikes"] == want["spikes"] and got["spikes"], (scenario, got["spikes"])
        assert "use sophia (SophiaG" in sharded[rank].get("sophia_h", ""), "sophia_h trained on shards"


# every name that runs on shards (the matrix optimizers' owner-held state included)
CKPT_NAMES = [n for n in available_optimizers() if n not in REFUSES]


# Optimizers without a >= 1-D state tensor cannot resume from a *full* checkpoint under
# ModelParallelStrategy: Lightning 2.6.6's loader reads the first optimizer-state entry
# (`_rekey_optimizer_state_if_needed`: IndexError on torch SGD without momentum, which keeps none) and
# torch 2.13's full-state `set_optimizer_state_dict` takes the device from such a tensor ("Expected
# device to be set"; LOMO keeps no state either). Sharded checkpoints resume them fine.
NO_STATE = {"sgd", "lomo"}


def _names(distributed: bool) -> list[str]:
    return CKPT_NAMES if distributed else [n for n in CKPT_NAMES if n not in NO_STATE]


def _ckpt_save_rank(rank: int, world_size: int, root: str, distributed: bool) -> None:
    lightning_env(rank, world_size)
    for name in _names(distributed):
        module = _Module(name)
        module.sharded = True
        trainer = _trainer(root, world_size, [], STEPS // 2, save_distributed_checkpoint=distributed)
        trainer.fit(module, _loader())
        trainer.save_checkpoint(f"{root}/{name}.ckpt")


def _ckpt_resume_rank(rank: int, world_size: int, root: str, distributed: bool) -> dict:
    lightning_env(rank, world_size)
    out = {}
    for name in _names(distributed):
        module = _Module(name)
        module.sharded = True
        with torch.no_grad():  # other weights: the checkpoint must bring them back
            for p in module.net.parameters():
                p.add_(1.0)
        trainer = _trainer(root, world_size, [], STEPS, save_distributed_checkpoint=distributed)
        trainer.fit(module, _loader(), ckpt_path=f"{root}/{name}.ckpt")
        out[name] = _full(module)
    return out


def _uninterrupted(name: str, root: str) -> dict[str, torch.Tensor]:
    module = _Module(name)
    _trainer(root, 1, [], STEPS).fit(module, _loader())
    return _full(module)


@pytest.mark.parametrize("distributed", [True, False], ids=["sharded_ckpt", "full_ckpt"])
def test_lightning_checkpoint_resume_under_fsdp2(tmp_path, distributed: bool) -> None:
    root = str(tmp_path)
    run_ranks(_ckpt_save_rank, root, distributed)
    resumed = run_ranks(_ckpt_resume_rank, root, distributed)
    for name in _names(distributed):
        want = _uninterrupted(name, f"{root}/ref_{name}")
        tol = 1e-5 if name in OWNER_COMPUTE else 1e-6 if name in REDUCES else 1e-7
        _close(resumed[0][name], want, tol, f"{name} resumed from a {'sharded' if distributed else 'full'} checkpoint")
        if not distributed:  # a full checkpoint also resumes on one process
            module = _Module(name)
            trainer = _trainer(f"{root}/one_{name}", 1, [], STEPS)
            trainer.fit(module, _loader(), ckpt_path=f"{root}/{name}.ckpt")
            _close(_full(module), want, tol, f"{name} saved on 2 ranks, resumed on 1")
