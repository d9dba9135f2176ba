"""Registry: names, aliases from Hugging Face and DeepSpeed, torch-backed entries, bad input."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import lightning_opt
from lightning_opt import available_optimizers, build_optimizer, get_optimizer_info
from lightning_opt.optim.registry import OptimInfo, register, register_alias, resolve

TORCH_BACKED = {
    "sgd": (torch.optim.SGD, {"momentum": 0.9}),
    "sgd_nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    "adagrad": (torch.optim.Adagrad, {}),
    "rmsprop": (torch.optim.RMSprop, {"momentum": 0.5, "centered": True}),
    "adam": (torch.optim.Adam, {"amsgrad": True}),
    "adamw": (torch.optim.AdamW, {"betas": (0.8, 0.95)}),
    "radam": (torch.optim.RAdam, {}),
    "nadam": (torch.optim.NAdam, {}),
}

# name users bring -> registry entry (and the arguments the name fixes)
HUGGINGFACE = {
    "adamw_torch": ("adamw", {}),
    "adamw_torch_fused": ("adamw", {"fused": True}),
    "adafactor": ("adafactor", {}),
    "sgd": ("sgd", {}),
    "adagrad": ("adagrad", {}),
    "rmsprop": ("rmsprop", {}),
    "adamw_8bit": ("adamw_8bit", {}),
    "adamw_bnb_8bit": ("adamw_8bit", {}),
    "paged_adamw_8bit": ("paged_adamw_8bit", {}),
    "lion_8bit": ("lion_8bit", {}),
    "paged_lion_8bit": ("paged_lion_8bit", {}),
    "lion_32bit": ("lion", {}),
    "schedule_free_adamw": ("schedule_free_adamw", {}),
    "schedule_free_sgd": ("schedule_free_sgd", {}),
    "schedule_free_radam": ("schedule_free_radam", {}),
    "apollo_adamw": ("apollo", {}),
    "grokadamw": ("grokadamw", {}),
    "adalomo": ("adalomo", {}),
    "stable_adamw": ("stable_adamw", {}),
}
DEEPSPEED = {
    "Adam": ("adam", {}),
    "AdamW": ("adamw", {}),
    "AdaFactorOptimizer": ("adafactor", {}),
    "Adagrad": ("adagrad", {}),
    "Lamb": ("lamb", {}),
    "Lion": ("lion", {}),
    "LionOptimizer": ("lion", {}),
    "MuonOptimizer": ("muon", {}),
    "SophiaOptimizer": ("sophia", {}),
}


def test_available_optimizers_is_sorted_and_complete() -> None:
    names = available_optimizers()
    assert names == sorted(names)
    assert set(TORCH_BACKED) <= set(names)


@pytest.mark.parametrize("name", sorted(TORCH_BACKED))
def test_torch_backed_entry_matches_torch_step_for_step(name: str) -> None:
    cls, hparams = TORCH_BACKED[name]
    assert get_optimizer_info(name).cls.torch_class is cls  # a factory adding impl= to torch's class
    torch.manual_seed(0)
    ours_model = nn.Linear(6, 4).double()
    ref_model = copy.deepcopy(ours_model)
    fixed = {k: v for k, v in hparams.items() if k not in get_optimizer_info(name).fixed}
    # torch's default path on the CPU, bit for bit (impl='auto' takes torch's fused kernel, which
    # agrees to rounding: tests/optim/test_torch_builtin.py)
    ours = build_optimizer(list(ours_model.parameters()), name, lr=1e-2, weight_decay=0.05, impl="for_loop", **fixed)
    ref = cls(ref_model.parameters(), lr=1e-2, weight_decay=0.05, **hparams)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.randn(16, 6, generator=g, dtype=torch.float64)
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(("alias", "expected"), sorted(HUGGINGFACE.items()))
def test_huggingface_names(alias: str, expected: tuple[str, dict]) -> None:
    info, fixed = resolve(alias)
    assert (info.name, {k: v for k, v in fixed.items() if k not in info.fixed}) == expected


@pytest.mark.parametrize(("alias", "expected"), sorted(DEEPSPEED.items()))
def test_deepspeed_names(alias: str, expected: tuple[str, dict]) -> None:
    info, fixed = resolve(alias)
    assert (info.name, {k: v for k, v in fixed.items() if k not in info.fixed}) == expected


def test_alias_fixed_argument_reaches_the_optimizer() -> None:
    opt = build_optimizer(nn.Linear(2, 2), "adamw_torch_fused", lr=1e-3)
    assert opt.defaults["fused"] is True
    with pytest.raises(TypeError, match="fixes fused=True"):
        build_optimizer(nn.Linear(2, 2), "adamw_torch_fused", lr=1e-3, fused=False)
    with pytest.raises(TypeError, match="fixes nesterov=True"):
        build_optimizer(nn.Linear(2, 2), "sgd_nesterov", lr=1e-3, nesterov=False)


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamww'; did you mean 'adamw'.*registered: .*sgd"):
        build_optimizer(nn.Linear(2, 2), "adamww", lr=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"lr": -1.0}, ValueError, r"lr=-1.0\) is invalid"),
        ({"lr": float("nan")}, ValueError, r"lr=nan\) is invalid"),
        ({"lr": 1e-3, "betas": (0.9, 1.0)}, ValueError, "betas"),
        ({"lr": 1e-3, "betas": (-0.1, 0.9)}, ValueError, "betas"),
        ({"lr": 1e-3, "weight_decay": -0.1}, ValueError, "weight_decay"),
        ({"lr": 1e-3, "eps": -1e-8}, ValueError, "eps"),
        ({"lr": 1e-3, "layer_decay": 1.2}, ValueError, r"layer_decay"),
        ({"lr": 1e-3, "amsgrad": float("nan")}, ValueError, r"amsgrad=nan\) is invalid"),
        ({"lr": 1e-3, "momentum": 0.9}, TypeError, "adamw takes no 'momentum'; it takes: lr, betas, eps"),
    ],
)
def test_bad_input_is_rejected_and_changes_nothing(kwargs: dict, error: type, message: str) -> None:
    model = TinyBlocks()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        build_optimizer(model, "adamw", **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(("name", "flag"), [("sgd", "nesterov"), ("adam", "amsgrad"), ("adamw", "maximize"), ("rmsprop", "centered")])
def test_a_flag_must_be_a_bool(name: str, flag: str) -> None:
    with pytest.raises(ValueError, match=f"{flag}='false'\) is invalid; expected True or False"):
        build_optimizer(nn.Linear(2, 2), name, lr=0.1, **{flag: "false"})


@pytest.mark.parametrize("name", ["sgd", "lookahead_sgd", "rmsprop"])
@pytest.mark.parametrize("momentum", [float("nan"), 1.0, -0.1])
def test_momentum_outside_the_unit_interval(name: str, momentum: float) -> None:
    with pytest.raises(ValueError, match="momentum"):
        build_optimizer(nn.Linear(2, 2), name, lr=0.1, momentum=momentum)


def test_sgd_eps_error_lists_what_sgd_takes() -> None:
    with pytest.raises(TypeError, match="sgd takes no 'eps'; it takes: lr, momentum, dampening, weight_decay, nesterov"):
        build_optimizer(nn.Linear(2, 2), "sgd", lr=0.1, eps=1e-8)


def test_model_without_trainable_parameters() -> None:
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(nn.Linear(2, 2).requires_grad_(False), "sgd", lr=0.1)


def test_grouping_options_need_a_model() -> None:
    with pytest.raises(ValueError, match="need an nn.Module"):
        build_optimizer(list(nn.Linear(2, 2).parameters()), "sgd", lr=0.1, layer_decay=0.5)


def test_param_group_dicts_keep_their_settings() -> None:
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = build_optimizer([{"params": a.parameters(), "lr": 0.5}, {"params": b.parameters(), "lr_scale": 0.1}], "sgd", lr=1.0, weight_decay=0.2)
    assert [g["lr"] for g in opt.param_groups] == [0.5, pytest.approx(0.1)]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.2]


def test_a_name_registers_once() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register(OptimInfo(name="adamw", cls=torch.optim.AdamW, description="again"))
    with pytest.raises(ValueError, match="already registered"):
        register_alias("adamw_torch", "sgd", source="huggingface")
    with pytest.raises(ValueError, match="unregistered"):
        register_alias("zzz", "no_such_optimizer", source="test")


def test_import_loads_no_optional_dependency() -> None:
    code = (
        "import sys, lightning_opt, lightning_opt.callbacks; lightning_opt.available_optimizers();"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('triton','bitsandbytes','transformer_engine')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


class TinyBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(3, 3) for _ in range(2))


def test_the_optimizers_never_import_the_callbacks() -> None:
    # OptimInfo.callbacks names them by path; the mixin imports them when it builds them
    code = (
        "import sys, lightning_opt, lightning_opt.optim;"
        "lightning_opt.available_optimizers();"
        "print(sorted(m for m in sys.modules if m.startswith('lightning_opt.callbacks.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_callbacks_are_named_by_import_path() -> None:
    from lightning_opt.optim.registry import make_callbacks

    with pytest.raises(ValueError, match="'module:Class'"):
        OptimInfo(name="x", cls=torch.optim.SGD, description="", callbacks=(lambda: None,))
    assert [type(cb).__name__ for cb in make_callbacks(get_optimizer_info("sophia"))] == ["SophiaHessian"]
