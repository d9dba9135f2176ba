"""FP8Precision on 2 gloo ranks: DDP with delayed scaling reduces the amaxes over the ranks; FSDP2 with layers
converted before fully_shard equals the per-rank reference; converting after it is refused; torchao's FP8
all-gather under FSDP2 gets its scales precomputed after each step and equals the high-precision all-gather;
under Lightning's ModelParallelStrategy, converting in configure_model before fully_shard equals one process."""

from __future__ import annotations

import copy
import importlib.util

import lightning as L
import pytest
import torch
from torch import nn

from lightning_opt.plugins import FP8Precision
from lightning_opt.plugins._fp8_torch import FP8Linear
from tests.distributed._harness import fsdp2_shard, run_ranks


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))


def _batch(rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(16, 32, generator=g) * (1 + rank + step)  # ranks see different amaxes


def _ddp_delayed(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model()
    plugin = FP8Precision(recipe="delayed", precision="32-true", amax_history_len=4)
    plugin.convert_layers(model)
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        with plugin.forward_context():
            loss = ddp(_batch(rank, step)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        plugin.after_optimizer_step()
    return {"state": plugin.state_dict(), "weight": model[0].weight.detach().clone()}


def test_ddp_delayed_scaling_reduces_amax_over_ranks() -> None:
    r0, r1 = run_ranks(_ddp_delayed)
    assert torch.equal(r0["weight"], r1["weight"])
    for name in ("0", "2"):
        a, b = r0["state"]["layers"][name], r1["state"]["layers"][name]
        assert torch.equal(a["amax_history"], b["amax_history"]) and torch.equal(a["scale"], b["scale"])
    # the first layer's input amax of each step is the max over both ranks' batches (newest first after the roll)
    want = [max(_batch(r, s).abs().max().item() for r in range(2)) for s in (2, 1, 0)]
    assert r0["state"]["layers"]["0"]["amax_history"][0, 1:].tolist() == want


def _fsdp2(rank: int, world: int) -> dict:
    from torch.distributed.tensor import DTensor

    model = _model()
    plugin = FP8Precision(recipe="tensorwise", precision="32-true")
    plugin.convert_layers(model)  # before fully_shard, as configure_model does
    fsdp2_shard(model)
    assert isinstance(model[0], FP8Linear) and isinstance(model[0].weight, DTensor)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        model(_batch(rank, step)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    late = _model()
    fsdp2_shard(late)
    try:
        FP8Precision().convert_layers(late)
        refused = ""
    except RuntimeError as err:
        refused = str(err)
    return {"weights": [p.full_tensor().detach().clone() for p in model.parameters()], "refused": refused}


def test_fsdp2_converted_before_sharding_equals_reference() -> None:
    results = run_ranks(_fsdp2)
    ref = _model()
    FP8Precision(recipe="tensorwise", precision="32-true").convert_layers(ref)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(2):  # each rank's FP8 forward on its own batch, gradients averaged
        grads = []
        for rank in range(2):
            replica = copy.deepcopy(ref)
            replica(_batch(rank, step)).pow(2).mean().backward()
            grads.append([p.grad for p in replica.parameters()])
        for p, g0, g1 in zip(ref.parameters(), *grads):
            p.grad = (g0 + g1) / 2
        opt.step()
    for got in results:
        for a, b in zip(got["weights"], ref.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
        assert "already sharded (DTensor parameters)" in got["refused"] and "configure_model" in got["refused"]


def _torchao_fsdp2(rank: int, world: int, all_gather: bool) -> dict:
    model = _model()
    plugin = FP8Precision(backend="torchao", recipe="tensorwise", precision="32-true",
                          fsdp_float8_all_gather=all_gather)
    plugin.convert_layers(model)
    fsdp2_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        model(_batch(rank, step)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        plugin.after_optimizer_step()
    local = model[0].weight._local_tensor
    return {
        "kind": type(local).__name__,
        "precomputed": getattr(local, "_precomputed_scale", None) is not None,
        "weights": [p.full_tensor().detach().clone() for p in model.parameters()],
    }


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed")
def test_torchao_fp8_all_gather_under_fsdp2() -> None:
    import torchao.float8  # noqa: F401 - imported once here; the forked ranks inherit it

    fp8 = run_ranks(_torchao_fsdp2, True)
    plain = run_ranks(_torchao_fsdp2, False)
    assert fp8[0]["kind"] == "WeightWithDynamicFloat8CastTensor" and fp8[0]["precomputed"]
    assert not plain[0]["precomputed"]
    for a, b in zip(fp8[0]["weights"], plain[0]["weights"]):  # same FP8 numerics, cast before or after the gather
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _Sharded(L.LightningModule):
    """Converts its layers to FP8 in configure_model, then shards them (the documented order)."""

    def __init__(self, shard: bool) -> None:
        super().__init__()
        self.net, self.shard = _model(), shard

    def configure_model(self) -> None:
        self.trainer.precision_plugin.convert_layers(self)
        if self.shard:
            fsdp2_shard(self.net)

    def training_step(self, batch, batch_idx):
        return self.net(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _lightning_fit(world: int) -> dict:
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader

    module = _Sharded(shard=world > 1)
    plugin = FP8Precision(recipe="delayed", precision="32-true")
    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1) if world > 1 else "auto"
    trainer = L.Trainer(
        strategy=strategy, accelerator="cpu", devices=world, plugins=[plugin], max_steps=3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, num_sanity_val_steps=0,
    )
    # every rank trains on the same batches, so the sharded run must equal one process
    trainer.fit(module, DataLoader([_batch(0, s) for s in range(3)], batch_size=None))
    full = [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in module.net.parameters()]
    return {"weights": full, "fp8": isinstance(module.net[0], FP8Linear), "state": plugin.state_dict()}


def _lightning_rank(rank: int, world: int) -> dict:
    import os

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    return _lightning_fit(world)


def test_model_parallel_strategy_converts_in_configure_model() -> None:
    ranks = run_ranks(_lightning_rank)
    ref = _lightning_fit(1)
    for got in ranks:
        assert got["fp8"]
        for a, b in zip(got["weights"], ref["weights"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for name, s in got["state"]["layers"].items():
            assert torch.equal(s["amax_history"], ref["state"]["layers"][name]["amax_history"])
