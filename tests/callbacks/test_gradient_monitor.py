"""GradientMonitor: values against direct computation, before clipping, every N steps; DDP and FSDP2 equal one process."""

from __future__ import annotations

import math
import os
import socket
import warnings
from types import SimpleNamespace

import lightning.pytorch as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_opt.callbacks import GradientMonitor
from lightning_opt.callbacks.gradient_monitor import global_grad_norm, layer_of
from tests.distributed._harness import lightning_env, run_ranks

warnings.filterwarnings("ignore", ".*does not have many workers.*")

LR = 0.1


class Net(L.LightningModule):
    """``blocks.{0,1}.0`` Linear layers, a ``head``, and optionally an ``unused`` layer that gets no gradient."""

    def __init__(self, unused=True, nan_at=None):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(4, 8), nn.Tanh()), nn.Sequential(nn.Linear(8, 8), nn.Tanh())]
        )
        self.head = nn.Linear(8, 1)
        self.unused = nn.Linear(2, 2) if unused else None
        self.nan_at = nan_at

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.nan_at is not None and self.global_step == self.nan_at:
            mask = torch.zeros_like(self.blocks[1][0].weight, dtype=torch.bool)
            mask[0, :3] = True
            self.blocks[1][0].weight.register_hook(lambda g: g.masked_fill(mask, float("nan")))
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def _dataset(n=64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, torch.sin(x.sum(1, keepdim=True)))


class Recorder(Logger):
    def __init__(self):
        super().__init__()
        self.calls = []

    @property
    def name(self):
        return "rec"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class Reference(Callback):
    """Independent per-layer norms, measured right after the monitor in the same hook, and the params after the step."""

    def __init__(self, depth):
        self.depth, self.at = depth, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        layers = {}
        for n, p in pl_module.named_parameters():
            key = ".".join(n.split(".")[:-1][: self.depth])
            entry = layers.setdefault(key, {"g": 0.0, "p": 0.0})
            entry["p"] += p.detach().double().pow(2).sum().item()
            if p.grad is not None:
                entry["g"] += p.grad.double().pow(2).sum().item()
        self.at[trainer.global_step] = layers


def _fit(tmp_path, model, monitor, steps, **kw):
    rec, ref = Recorder(), Reference(monitor.depth)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=rec,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor, ref],
        **kw,
    )
    trainer.fit(model, DataLoader(_dataset(), batch_size=8))
    return rec, ref


def test_logs_every_n_steps_with_values_equal_to_a_direct_computation(tmp_path):
    monitor = GradientMonitor(log_every_n_steps=3, depth=2)
    with pytest.warns(UserWarning, match="received no gradient: unused.weight, unused.bias"):
        rec, ref = _fit(tmp_path, Net(), monitor, 7, gradient_clip_val=1e-3)
    mine = [(s, m) for s, m in rec.calls if "grad_norm/total" in m]
    assert [s for s, _ in mine] == [3, 6]  # after steps 3 and 6 (global_step 2 and 5 during the step)
    for (step, metrics), gs in zip(mine, (2, 5)):
        layers = ref.at[gs]
        assert set(layers) == {"blocks.0", "blocks.1", "head", "unused"}
        for layer, vals in layers.items():
            # measured before clipping (the clip at 1e-3 would make every norm tiny)
            assert metrics[f"grad_norm/{layer}"] == pytest.approx(math.sqrt(vals["g"]), rel=1e-5)
            assert metrics[f"param_norm/{layer}"] == pytest.approx(math.sqrt(vals["p"]), rel=1e-5)
        total = math.sqrt(sum(v["g"] for v in layers.values()))
        assert metrics["grad_norm/total"] == pytest.approx(total, rel=1e-5) and total > 1e-2
        assert metrics["param_norm/total"] == pytest.approx(math.sqrt(sum(v["p"] for v in layers.values())), rel=1e-5)
        # plain SGD, clipped to 1e-3: ||update|| = lr * 1e-3 * ||g_layer|| / ||g||
        for layer in ("blocks.0", "blocks.1", "head"):
            expected = LR * 1e-3 * math.sqrt(layers[layer]["g"]) / total / math.sqrt(layers[layer]["p"])
            assert metrics[f"update_ratio/{layer}"] == pytest.approx(expected, rel=1e-3)
        assert metrics["update_ratio/unused"] == 0.0
        assert metrics["grad/missing"] == 2.0 and metrics["grad/nonfinite"] == 0.0
    assert monitor.missing_grads == ["unused.weight", "unused.bias"]
    assert monitor.metrics == mine[-1][1]


def test_depth_groups_parameters_by_module_path(tmp_path):
    assert layer_of("transformer.h.0.attn.c_attn.weight", 3) == "transformer.h.0"
    assert layer_of("lm_head.weight", 3) == "lm_head"
    assert layer_of("transformer.h.0.attn.c_attn.weight", None) == "transformer.h.0.attn.c_attn"
    assert layer_of("scale", 2) == "scale"
    monitor = GradientMonitor(log_every_n_steps=1, depth=1, log_update_ratio=False)
    _fit(tmp_path, Net(unused=False), monitor, 1)
    assert {k for k in monitor.metrics if k.startswith("grad_norm/")} == {
        "grad_norm/total",
        "grad_norm/blocks",
        "grad_norm/head",
    }
    # log_update_ratio=False: no update ratios and no copy of the parameters
    assert not any(k.startswith("update_ratio/") for k in monitor.metrics)
    monitor = GradientMonitor(log_every_n_steps=1, depth=None)
    _fit(tmp_path, Net(unused=False), monitor, 1)
    assert {k for k in monitor.metrics if k.startswith("update_ratio/")} == {
        "update_ratio/blocks.0.0",
        "update_ratio/blocks.1.0",
        "update_ratio/head",
    }


def test_counts_non_finite_gradients_and_names_the_first(tmp_path):
    monitor = GradientMonitor(log_every_n_steps=1)
    with pytest.warns(
        UserWarning, match="3 non-finite gradient elements; the first parameter with one is 'blocks.1.0.weight'"
    ):
        _fit(tmp_path, Net(unused=False, nan_at=1), monitor, 2)
    assert monitor.metrics["grad/nonfinite"] == 3.0
    assert monitor.first_nonfinite == "blocks.1.0.weight"
    assert math.isnan(monitor.metrics["grad_norm/total"])


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"log_every_n_steps": 0}, "log_every_n_steps=0"), ({"depth": 0}, "depth=0")]
)
def test_invalid_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientMonitor(**kwargs)


# ----------------------------------------------------------------------------- distributed


def _single_process_reference():
    """Norms of the first full batch (rows 0..7), one process, no sharding."""
    model = Net(unused=False)
    x, y = _dataset().tensors
    F.mse_loss(model(x[:8]), y[:8]).backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters()}
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    total = math.sqrt(sum(g.pow(2).sum().item() for g in grads.values()))

    def layer(name):  # written out, not the helper under test
        return ".".join(name.split(".")[:-1][:3])

    per_layer = {}
    for n, g in grads.items():
        per_layer[layer(n)] = per_layer.get(layer(n), 0.0) + g.pow(2).sum().item()
    ratio = {
        k: LR * math.sqrt(v) / math.sqrt(sum(p.pow(2).sum().item() for n, p in params.items() if layer(n) == k))
        for k, v in per_layer.items()
    }
    return total, {k: math.sqrt(v) for k, v in per_layer.items()}, ratio


class RankRows(torch.utils.data.Sampler):
    """Rows ``rank, rank + world, ...``, read when iterated (inside the spawned process)."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(dist.get_rank(), self.n, dist.get_world_size()))

    def __len__(self):
        return self.n // 2


class SaveMetrics(Callback):
    def __init__(self, out):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        monitor = next(cb for cb in trainer.callbacks if isinstance(cb, GradientMonitor))
        torch.save(monitor.metrics, os.path.join(self.out, f"ddp{trainer.global_rank}.pt"))


def _ddp_rank(rank: int, world_size: int, out: str) -> None:
    lightning_env(rank, world_size)
    trainer = L.Trainer(
        default_root_dir=out,
        max_steps=1,
        accelerator="cpu",
        devices=world_size,
        strategy=DDPStrategy(process_group_backend="gloo"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[GradientMonitor(log_every_n_steps=1), SaveMetrics(out)],
    )
    # rank r reads rows r, r+2, ...: two half batches of 4 whose union is rows 0..7
    trainer.fit(Net(unused=False), DataLoader(_dataset(), batch_size=4, sampler=RankRows(64)))
    dist.barrier()  # both ranks done with their collectives before gloo is torn down (see _fsdp_worker)


def test_ddp_global_norm_equals_single_process(tmp_path):
    run_ranks(_ddp_rank, str(tmp_path))
    total, per_layer, ratio = _single_process_reference()
    for r in (0, 1):
        m = torch.load(tmp_path / f"ddp{r}.pt")
        assert m["grad_norm/total"] == pytest.approx(total, rel=1e-5)
        for k, v in per_layer.items():
            assert m[f"grad_norm/{k}"] == pytest.approx(v, rel=1e-5)
            assert m[f"update_ratio/{k}"] == pytest.approx(ratio[k], rel=1e-4)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        model = Net(unused=False)
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert type(model.head.weight).__name__ == "DTensor"
        x, y = _dataset().tensors
        F.mse_loss(model(x[rank:8:world]), y[rank:8:world]).backward()  # FSDP2 averages the shards' gradients
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        monitor = GradientMonitor(log_every_n_steps=1)
        trainer = SimpleNamespace(global_step=0, loggers=[])
        monitor.on_before_optimizer_step(trainer, model, opt)
        norm = global_grad_norm(model.parameters()).item()
        opt.step()
        monitor.on_train_batch_end(trainer, model, None, None, 0)
        torch.save({"metrics": monitor.metrics, "norm": norm}, os.path.join(out, f"fsdp{rank}.pt"))
        # both ranks done with their collectives before gloo is torn down (a rank that tore down
        # while the other still talked aborted with "terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_norms_equal_single_process(tmp_path):
    mp.spawn(_fsdp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    total, per_layer, ratio = _single_process_reference()
    for r in (0, 1):
        got = torch.load(tmp_path / f"fsdp{r}.pt")
        m = got["metrics"]
        assert got["norm"] == pytest.approx(total, rel=1e-5)
        assert m["grad_norm/total"] == pytest.approx(total, rel=1e-5)
        for k, v in per_layer.items():
            assert m[f"grad_norm/{k}"] == pytest.approx(v, rel=1e-5)
            assert m[f"update_ratio/{k}"] == pytest.approx(ratio[k], rel=1e-4)
