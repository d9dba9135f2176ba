"""Layer-wise LR decay on real timm models equals timm's ``create_optimizer_v2(..., layer_decay=...)``.

timm is a test oracle installed without dependencies (``tests/oracles-nodeps.txt``): its pip
dependency torchvision would replace this project's torch. timm imports torchvision at import time
for a few names (``FrozenBatchNorm2d``, data transforms) that the models and param-group functions
used here never call; where torchvision is not importable, a stand-in module answers those imports
while timm is imported, and every use of one of its names raises.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
import types

import pytest
import torch
from torch import nn

from lightning_opt import param_groups


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``torchvision.*`` modules whose every attribute is a class that raises when it is used."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


class _Missing(type):
    def __getattr__(cls, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing(f"{cls.__qualname__}.{name}")


def _missing(qualname: str) -> type:
    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{qualname}: torchvision is not importable here (a stand-in answered timm's import)")

    return _Missing(qualname, (), {"__init__": fail, "__qualname__": qualname})


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _missing(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


def _drop_torchvision() -> None:
    for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[key]


def _import_timm() -> types.ModuleType:
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or a build for another torch (ImportError, RuntimeError)
        _drop_torchvision()
        finder = _TorchvisionStandIn()
        sys.meta_path.insert(0, finder)
        try:
            import timm
            import timm.optim  # noqa: F401
        finally:
            # nothing else may see a torchvision (transformers checks for one)
            sys.meta_path.remove(finder)
            _drop_torchvision()
    import timm
    import timm.optim

    return timm


timm = _import_timm()

MODELS = ["convnext_atto", "swin_tiny_patch4_window7_224", "efficientnet_b0", "vit_tiny_patch16_224", "deit_tiny_patch16_224"]


def _per_parameter(groups: list[dict], *, timm_style: bool) -> dict[int, tuple[float, float]]:
    out: dict[int, tuple[float, float]] = {}
    for g in groups:
        # timm keeps the base lr in `lr` and the layer scale in `lr_scale` (read by its scheduler); ours bakes it in
        lr = g["lr"] * g.get("lr_scale", 1.0) if timm_style else g["lr"]
        for p in g["params"]:
            assert id(p) not in out
            out[id(p)] = (lr, g["weight_decay"])
    return out


@functools.cache
def _create(name: str) -> nn.Module:
    # grouping reads names and shapes only: build on the meta device, without initializing storage
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False)


@pytest.fixture(params=MODELS)
def model(request: pytest.FixtureRequest) -> nn.Module:
    return _create(request.param)


@pytest.mark.parametrize("layer_decay", [0.75, 0.6])
def test_every_parameter_gets_timms_lr_and_weight_decay(model: nn.Module, layer_decay: float) -> None:
    lr, wd = 1e-3, 0.05
    ref = _per_parameter(timm.optim.create_optimizer_v2(model, "adamw", lr=lr, weight_decay=wd, layer_decay=layer_decay).param_groups, timm_style=True)
    ours = _per_parameter(param_groups(model, lr=lr, weight_decay=wd, layer_decay=layer_decay), timm_style=False)
    names = {id(p): n for n, p in model.named_parameters()}
    assert set(ours) == set(ref)
    wrong_lr = [names[i] for i in ref if ours[i][0] != pytest.approx(ref[i][0], rel=1e-12, abs=0)]
    wrong_wd = [names[i] for i in ref if ours[i][1] != ref[i][1]]
    assert not wrong_lr, f"{len(wrong_lr)} of {len(ref)} parameters get another lr than timm's: {wrong_lr[:5]}"
    assert not wrong_wd, f"no-decay set differs from timm's: {wrong_wd[:5]}"
    # the decay really varies: the stem is below the head
    assert len({lr for lr, _ in ours.values()}) > 5


def test_wrapped_timm_model_gets_timms_ids() -> None:
    """A LightningModule-like wrapper: the inner timm model's group_matcher() is used, names relative to it."""
    inner = _create("convnext_atto")
    wrapper = nn.Module()
    wrapper.model = inner
    ref = _per_parameter(timm.optim.create_optimizer_v2(inner, "adamw", lr=1.0, weight_decay=0.1, layer_decay=0.75).param_groups, timm_style=True)
    ours = _per_parameter(param_groups(wrapper, lr=1.0, weight_decay=0.1, layer_decay=0.75), timm_style=False)
    assert all(ours[i][0] == pytest.approx(ref[i][0], rel=1e-12) and ours[i][1] == ref[i][1] for i in ref)


def test_swin_downsample_joins_the_next_stages_first_block() -> None:
    swin = _create("swin_tiny_patch4_window7_224")
    where = {n: g["lr_scale"] for g in param_groups(swin, lr=1.0, weight_decay=0.0, layer_decay=0.5) for n in g["param_names"]}
    assert where["layers.1.downsample.reduction.weight"] == where["layers.1.blocks.0.attn.qkv.weight"]
    # blocks are numbered cumulatively: stage 1's first block is block 3 (stage 0 has 2), of 12; head 13
    assert where["layers.1.blocks.0.attn.qkv.weight"] == 0.5 ** (13 - 3)
    assert where["norm.weight"] == where["layers.3.blocks.1.attn.qkv.weight"] == 0.5
