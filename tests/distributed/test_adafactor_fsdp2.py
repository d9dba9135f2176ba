"""Adafactor on FSDP2 shards (2 gloo ranks) equals the unsharded run, with coalesced all-reduces."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lightning_opt.optim.adafactor import TRANSFORMERS_ADAFACTOR, Adafactor
from tests.distributed._harness import UnevenNet, fsdp2_shard, run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

STEPS = 5
BATCH = 6
# torch's algorithm on the matrices (eps1 clamps, lr-coupled decay), transformers' on the rest with
# momentum: both variants, and two groups whose reductions must share the collectives
CONFIGS = {
    "torch": lambda ps: Adafactor(ps, weight_decay=0.1),
    "groups": lambda ps: Adafactor(
        [
            {"params": [p for p in ps if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in ps if p.ndim < 2], **TRANSFORMERS_ADAFACTOR, "beta1": 0.9, "weight_decay": 0.05},
        ]
    ),
    "transformers": lambda ps: Adafactor(ps, lr=3e-2, **{**TRANSFORMERS_ADAFACTOR, "relative_step": False, "beta1": 0.8}),
}


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(BATCH, 12, generator=g) for _ in range(STEPS)]


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: list[torch.Tensor]) -> None:
    for x in batches:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def _rank(rank: int, world: int, path: str) -> dict:
    out: dict = {"params": {}, "all_reduces": {}, "placements": {}}
    real_all_reduce = dist.all_reduce
    for name, make in CONFIGS.items():
        model = fsdp2_shard(UnevenNet(seed=0))
        opt = make(list(model.parameters()))
        calls = [0]

        def counting(*args, **kwargs):
            calls[0] += 1
            return real_all_reduce(*args, **kwargs)

        dist.all_reduce = counting
        try:
            per = BATCH // world
            _train(model, opt, [x[rank * per : (rank + 1) * per] for x in _batches()])
        finally:
            dist.all_reduce = real_all_reduce
        out["all_reduces"][name] = calls[0]
        out["params"][name] = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
        out["placements"][name] = {
            n: {k: str(tuple(v.placements)) for k, v in opt.state[p].items() if k != "step"}
            for n, p in model.named_parameters()
        }
    # sharded checkpoint round trip: 2 steps, state_dict, a fresh optimizer loads it, 3 more steps
    model = fsdp2_shard(UnevenNet(seed=0))
    opt = CONFIGS["groups"](list(model.parameters()))
    per = BATCH // world
    local = [x[rank * per : (rank + 1) * per] for x in _batches()]
    _train(model, opt, local[:2])
    saved = copy.deepcopy(opt.state_dict())
    # and a distributed checkpoint of the same point, which the test loads on one process
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    opt = CONFIGS["groups"](list(model.parameters()))
    opt.load_state_dict(saved)
    _train(model, opt, local[2:])
    out["resumed"] = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[list[dict], str]:
    """One 2-rank run for the tests below: its per-rank results and its distributed checkpoint."""
    path = str(tmp_path_factory.mktemp("adafactor_fsdp2") / "dcp")
    return run_ranks(_rank, path, world_size=2), path


def test_fsdp2_shards_equal_the_unsharded_run(ranks) -> None:
    results = ranks[0]
    for name, make in CONFIGS.items():
        model = UnevenNet(seed=0)
        _train(model, make(list(model.parameters())), _batches())
        for n, ref in model.named_parameters():
            for rank, res in enumerate(results):
                got = res["params"][name][n]
                err = float((got - ref.detach()).abs().max() / ref.detach().abs().max())
                assert err < 1e-6, f"{name}: {n} on rank {rank} differs from the unsharded run by {err:.2e} (relative)"
        # two coalesced all-reduces per step (the statistics with RMS(P), then RMS(U)), not one per parameter
        assert [r["all_reduces"][name] for r in results] == [2 * STEPS] * 2, name
    placements = results[0]["placements"]["torch"]
    # rows stay sharded with the rows; column statistics of a row-sharded matrix are complete everywhere
    assert placements["a.weight"] == {"row_var": "(Shard(dim=0),)", "col_var": "(Replicate(),)"}
    assert placements["cube"] == {"row_var": "(Shard(dim=0),)", "col_var": "(Shard(dim=0),)"}
    assert placements["a.bias"] == {"variance": "(Shard(dim=0),)"}
    assert set(results[0]["placements"]["groups"]["a.bias"]) == {"variance", "exp_avg"}
    for rank, res in enumerate(results):
        for n, p in res["resumed"].items():
            torch.testing.assert_close(p, res["params"]["groups"][n], rtol=0, atol=0, msg=lambda m: f"resume rank {rank} {n}: {m}")


def test_distributed_checkpoint_saved_on_2_ranks_resumes_on_1(ranks) -> None:
    """DCP save of the sharded state (2 ranks, after 2 steps), load into one process, 3 more steps == 5 straight."""
    path = ranks[1]
    model = UnevenNet(seed=0)
    opt = CONFIGS["groups"](list(model.parameters()))
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    assert opt.state[model.a.weight]["row_var"].shape == (7, 1) and opt.state[model.a.weight]["col_var"].shape == (1, 12)
    _train(model, opt, _batches()[2:])
    ref = UnevenNet(seed=0)
    _train(ref, CONFIGS["groups"](list(ref.parameters())), _batches())
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        err = float((a - b).detach().abs().max() / b.detach().abs().max())
        assert err < 1e-6, f"{n}: resumed on 1 process differs by {err:.2e} (relative)"
