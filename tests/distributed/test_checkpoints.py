"""Sharded checkpoints through ``torch.distributed.checkpoint`` for every name that runs on shards
(the matrix optimizers' owner-held state included).

N steps on 2 FSDP2 ranks + ``dcp.save`` (``get_model_state_dict`` / ``get_optimizer_state_dict``),
then ``dcp.load`` into a 1-process model and optimizer + N steps equals 2N uninterrupted steps; and
the reverse (1 process saves, 2 ranks load and continue). ``get_optimizer_state_dict`` creates the
state of a fresh optimizer with a zero-learning-rate step, so that step must change nothing, every
state must exist for every parameter, and no per-rank state may be a plain tensor (DCP would take it
as replicated and keep one rank's copy).
"""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lightning_opt import available_optimizers, build_optimizer, get_optimizer_info
from tests.distributed._harness import UnevenNet, fsdp2_shard, run_ranks
from tests.distributed.test_every_name import HPARAMS, OWNER_COMPUTE, REDUCES, REFUSES

N = 3
X = torch.randn(8, 12, generator=torch.Generator().manual_seed(2))
NAMES = [n for n in available_optimizers() if n not in REFUSES]


def _build(name: str, model: nn.Module) -> torch.optim.Optimizer:
    return build_optimizer(
        model, name, lr=get_optimizer_info(name).default_lr * 0.1, weight_decay=0.01, **HPARAMS.get(name, {})
    )


def _steps(model: nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    for _ in range(n):
        opt.zero_grad()
        (model(X) ** 2).mean().backward()
        opt.step()


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for k, p in model.named_parameters()
    }


def _save(name: str, model: nn.Module, opt: torch.optim.Optimizer, path: str) -> None:
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=path)


def _load(name: str, model: nn.Module, path: str) -> torch.optim.Optimizer:
    opt = _build(name, model)
    before = _full(model)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    after_init = _full(model)
    for key, value in before.items():  # DCP's zero-lr step that creates the state moves nothing
        assert torch.equal(value, after_init[key]), f"{name}: the zero-lr state initialisation moved {key}"
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    return opt


def _sharded_save_rank(rank: int, world_size: int, names: list[str], root: str) -> None:
    for name in names:
        model = fsdp2_shard(UnevenNet())
        opt = _build(name, model)
        _steps(model, opt, N)
        _save(name, model, opt, f"{root}/{name}")


def _sharded_resume_rank(rank: int, world_size: int, names: list[str], root: str) -> dict[str, dict]:
    out = {}
    for name in names:
        model = fsdp2_shard(UnevenNet(seed=9))  # other weights: the checkpoint must bring them
        opt = _load(name, model, f"{root}/{name}")
        _steps(model, opt, N)
        out[name] = _full(model)
    return out


def _check(name: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    # matrix optimizers (owner-compute): float32 Newton-Schulz / eigenbases, 1e-5 as the issue allows
    tol = 1e-5 if name in OWNER_COMPUTE else 1e-6 if name in REDUCES else 1e-7
    for key, w in want.items():
        err = ((got[key] - w).abs().max() / w.abs().max().clamp_min(1e-30)).item()
        assert err <= tol, f"{name}: {key} after resume differs from the uninterrupted run by {err:.2e}"


def _uninterrupted(name: str) -> dict[str, torch.Tensor]:
    model = UnevenNet()
    _steps(model, _build(name, model), 2 * N)
    return _full(model)


def test_save_on_2_ranks_resume_on_1(tmp_path) -> None:
    root = str(tmp_path)
    run_ranks(_sharded_save_rank, NAMES, root)
    for name in NAMES:
        model = UnevenNet(seed=9)
        opt = _load(name, model, f"{root}/{name}")
        _steps(model, opt, N)
        _check(name, _full(model), _uninterrupted(name))


def test_save_on_1_resume_on_2_ranks(tmp_path) -> None:
    root = str(tmp_path)
    for name in NAMES:
        model = UnevenNet()
        opt = _build(name, model)
        _steps(model, opt, N)
        _save(name, model, opt, f"{root}/{name}")
    results = run_ranks(_sharded_resume_rank, NAMES, root)
    for name in NAMES:
        _check(name, results[0][name], _uninterrupted(name))
