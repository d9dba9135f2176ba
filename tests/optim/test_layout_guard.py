"""Optimizers that need whole parameters refuse the flat partitions DeepSpeed ZeRO swaps in.

ZeRO (and FSDP1 with ``use_orig_params=False``) replaces each group's ``params`` by flat 1-D
partitions after the optimizer is built; here that swap is done by hand (DeepSpeed itself needs a
GPU: see ``test_deepspeed_zero_refused_on_gpu``), and the first step must raise before any tensor
changes. A deep copy (a rollback snapshot) and a group added later are not swaps.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_opt import build_optimizer, get_optimizer_info
from lightning_opt.optim.layout import ParamsReplacedError

GUARDED = [
    "lamb", "lars", "stable_adamw", "grokadamw", "adafactor",
    "muon", "soap", "apollo", "apollo_mini", "adalomo", "shampoo",
]  # fmt: skip


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _build(name: str, model: nn.Module) -> torch.optim.Optimizer:
    return build_optimizer(model, name, lr=get_optimizer_info(name).default_lr, weight_decay=0.01)


def _zero_flatten(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """What ZeRO stage 1/2 does to the groups: one flat fp32 partition per group, with a gradient."""
    flats = []
    for group in opt.param_groups:
        flat = torch.cat([p.detach().reshape(-1) for p in group["params"]]).requires_grad_()
        flat.grad = torch.randn_like(flat)
        group["params"] = [flat]
        flats.append(flat)
    return flats


@pytest.mark.parametrize("name", GUARDED)
def test_flat_partitions_are_refused_before_anything_changes(name: str) -> None:
    model = _model()
    opt = _build(name, model)
    flats = _zero_flatten(opt)
    before = [f.detach().clone() for f in flats]
    with pytest.raises(ParamsReplacedError, match=r"DeepSpeed ZeRO.*flat 1-D partitions.*ModelParallelStrategy"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, flats))


@pytest.mark.parametrize("name", ["lamb", "muon", "soap"])
def test_deepcopy_and_added_groups_still_step(name: str) -> None:
    model = _model()
    opt = _build(name, model)
    model(torch.randn(4, 8)).sum().backward()
    clone = copy.deepcopy(opt)  # other tensors, same shapes
    clone.step()
    extra = nn.Parameter(torch.randn(5, 3))
    extra.grad = torch.randn(5, 3)
    named = "param_names" in opt.param_groups[0]  # build_optimizer passes names: torch wants all or none
    opt.add_param_group({"params": [extra], **({"param_names": ["extra"]} if named else {})})
    opt.step()


@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_elementwise_optimizers_take_flat_partitions(name: str) -> None:
    opt = _build(name, _model())
    _zero_flatten(opt)
    opt.step()  # elementwise math is the same on a flat partition: DeepSpeed users may keep these


@pytest.mark.gpu
def test_deepspeed_zero_refused_on_gpu(tmp_path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("DeepSpeed ZeRO needs a CUDA GPU (and deepspeed installed)")
    pytest.importorskip("deepspeed", reason="deepspeed is not installed")
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DeepSpeedStrategy

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _model()

        def training_step(self, batch, batch_idx):
            return self.net(batch).square().mean()

        def configure_optimizers(self):
            return _build("lamb", self.net)

    data = torch.utils.data.DataLoader(torch.randn(16, 8), batch_size=4)
    trainer = pl.Trainer(
        strategy=DeepSpeedStrategy(stage=2), accelerator="gpu", devices=1, max_steps=2, logger=False,
        enable_checkpointing=False, default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(ParamsReplacedError):
        trainer.fit(Module(), data)


class DeepSpeedStrategy:  # stands in for Lightning's (which needs deepspeed to be built): matched by name
    pass


@pytest.mark.parametrize("strategy", ["fsdp1", "deepspeed"])
def test_mixin_refuses_flattening_strategies_for_whole_param_optimizers(strategy: str) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_opt.demo import TinyGPT
    from lightning_opt.mixin import OptimizerConfig

    flat = FSDPStrategy() if strategy == "fsdp1" else DeepSpeedStrategy()
    model = TinyGPT(n_layer=1, n_embd=16, optimizer=OptimizerConfig(name="lamb", weight_decay=0.01))
    model._trainer = SimpleNamespace(strategy=flat, callbacks=[])
    with pytest.raises(ParamsReplacedError, match=r"Lamb cannot run under Lightning's .*ModelParallelStrategy"):
        model.configure_optimizers()
    model.optimizer = OptimizerConfig(name="adamw")
    model.configure_optimizers()  # elementwise: fine on flat partitions


def test_mixin_keeps_model_parallel_and_ddp() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from lightning_opt.demo import TinyGPT
    from lightning_opt.mixin import OptimizerConfig

    for strategy in (ModelParallelStrategy(), DDPStrategy()):
        model = TinyGPT(n_layer=1, n_embd=16, optimizer=OptimizerConfig(name="muon"))
        model._trainer = SimpleNamespace(strategy=strategy, callbacks=[])
        model.configure_optimizers()
