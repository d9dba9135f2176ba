"""Bad input gets a clear error when the object is built (issue 10): betas, per-group options,
OptimizerConfig's own hyperparameters, Muon without matrices, sgd_nesterov's momentum, the CLI."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch import nn

from lightning_opt import OptimizerConfig, build_optimizer


@pytest.mark.parametrize("name", ["adamw", "adam", "lion", "sophia", "schedule_free_adamw", "lookahead_adamw", "lamb"])
@pytest.mark.parametrize("betas", [(0.9, 0.99, 0.9), (0.9,), (0.9, 1.0)])
def test_betas_length_and_range_are_checked_at_construction(name: str, betas: tuple) -> None:
    with pytest.raises(ValueError, match=r"betas(\[0\])?=.*is invalid; (expected|each beta|beta2|it must lie)"):
        build_optimizer(nn.Linear(3, 3), name, lr=1e-3, betas=betas)


def test_torch_backed_factory_checks_betas_too() -> None:
    from lightning_opt.optim.torch_builtin import Adam

    with pytest.raises(ValueError, match=r"Adam\(betas=\(0.9, 0.9, 0.9\)\) is invalid"):
        Adam(nn.Linear(3, 3).parameters(), betas=(0.9, 0.9, 0.9))


def test_muon_group_ns_dtype_means_what_the_constructor_means() -> None:
    from lightning_opt.optim.muon import Muon

    w = nn.Parameter(torch.randn(8, 8))
    opt = Muon([{"params": [w], "ns_dtype": "float32"}])
    assert opt.param_groups[0]["ns_dtype"] is torch.float32
    w.grad = torch.randn(8, 8)
    opt.step()  # crashed with "Invalid device string: 'float32'" when the group's string reached the step
    assert torch.isfinite(w).all()
    for bad in ("float8", torch.float8_e4m3fn, "int8"):
        with pytest.raises(ValueError, match="ns_dtype"):
            opt.add_param_group({"params": [nn.Parameter(torch.randn(4, 4))], "ns_dtype": bad})
        with pytest.raises(ValueError, match="ns_dtype"):
            Muon([w], ns_dtype=bad)
    assert len(opt.param_groups) == 1


def test_muon_without_a_hidden_matrix_warns() -> None:
    from lightning_opt.optim.muon import Muon

    model = nn.ModuleDict({"embed": nn.Embedding(10, 4), "norm": nn.LayerNorm(4)})  # no hidden matrix
    with pytest.warns(UserWarning, match="no parameter is a 2-D hidden matrix"):
        build_optimizer(model, "muon", lr=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Muon([nn.Parameter(torch.randn(4, 4))])


def test_sgd_nesterov_momentum_is_a_default() -> None:
    model = nn.Linear(3, 3)
    opt = build_optimizer(model, "sgd_nesterov", lr=0.1)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"] is True
    assert build_optimizer(model, "sgd_nesterov", lr=0.1, momentum=0.5).defaults["momentum"] == 0.5
    with pytest.raises(ValueError, match="momentum"):
        build_optimizer(model, "sgd_nesterov", lr=0.1, momentum=0.0)  # torch: Nesterov needs a momentum


@pytest.mark.parametrize(
    ("name", "hparams", "message"),
    [
        ("soap", {"precondition_frequency": 0}, r"(?i)soap\(precondition_frequency=0\) is invalid"),
        ("muon", {"ns_steps": 0}, r"ns_steps=0\) is invalid"),
        ("lookahead_adamw", {"k": 0}, r"Lookahead\(k=0\) is invalid"),
        ("adamw", {"betas": [0.9, 0.99, 0.9]}, r"expected a tuple of 2 floats"),
    ],
)
def test_optimizer_config_checks_the_algorithms_own_values_when_made(name: str, hparams: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(name, lr=1e-3, hparams=hparams)


def test_cli_passes_the_command_line_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_opt import cli

    argv = ["lightning-opt", "fit", "--model=lightning_opt.demo.TinyGPT", "--data=lightning_opt.demo.CharDataModule"]
    monkeypatch.setattr(sys, "argv", argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli._cli(argv[2:], run=False, save_config=False)
    assert not [w for w in caught if "args parameter" in str(w.message)]
    assert sys.argv == argv
