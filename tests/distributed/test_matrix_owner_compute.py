"""Owner-compute for the matrix optimizers on 2 gloo ranks (lightning_opt.optim.distributed).

FSDP2 (``fully_shard`` on :class:`UnevenNet`: uneven rows, an empty shard, a 3-D tensor) and DDP
runs of ``muon``, ``soap``, ``apollo``, ``apollo_mini`` and ``adalomo`` after 5 steps equal the
1-process run, computed in each rank with ``distributed="local"`` (no communication: the
single-process code path, under the same one-thread setting). Two batches:

- ``"same"``: every rank gets the whole batch, so the global batch is W copies of it and every
  rank's gradient is bitwise the 1-process one; the owner runs the unchanged direction function
  on the same input, so muon, soap and apollo must be bitwise equal (adalomo's all-reduced sums
  add in another order: 1e-6).
- ``"halves"``: each rank gets half of the batch (the mean loss makes the gradients equal up to
  rounding): 1e-5, the issue's tolerance. SOAP is left out of this one: with 8 samples its
  preconditioners are singular and ``eigh`` picks an arbitrary basis of the null space, which a
  one-ulp change of the gradient moves (SOAP's docstring); the "same" batch proves its scheme.

Plus what moves (``comm_debug_mode``: no all-gather, two all-to-alls per step, the bytes the
scheme predicts), the checkpoint form of owner-held state, and the LPT assignment.
"""

from __future__ import annotations

import pytest
import torch

# torch.optim, DCP and FSDP2 import these on first use: once here, not in every forked rank
import torch._dynamo
import torch.distributed.checkpoint
import torch.distributed.checkpoint.state_dict
import torch.distributed.tensor
from torch import nn

from lightning_opt.optim import build_optimizer
from lightning_opt.optim.distributed import assign_owners, comm_debug_mode, load_balance, shard_rows
from lightning_opt.optim.muon import newton_schulz_flops
from tests.distributed._harness import UnevenNet, fsdp2_shard, run_ranks

CASES = {
    "muon": {"lr": 0.02, "weight_decay": 0.01, "flatten_conv": True, "ns_dtype": "float32"},
    "soap": {"lr": 3e-3, "precondition_frequency": 2},
    "apollo": {"lr": 1e-2, "rank": 2, "update_proj_gap": 3},
    "apollo_mini": {"lr": 1e-2, "update_proj_gap": 2},
    "adalomo": {"lr": 1e-3, "weight_decay": 0.1},
}
EXACT = {"muon", "soap", "apollo", "apollo_mini"}
STEPS = 5


def _batch() -> torch.Tensor:
    return torch.randn(8, 12, generator=torch.Generator().manual_seed(1))


def _train(model: nn.Module, name: str, kw: dict, x: torch.Tensor, steps: int = STEPS, wrapper=None):
    opt = build_optimizer(model, name, **kw)
    forward = wrapper or model
    for _ in range(steps):
        opt.zero_grad()
        forward(x).pow(2).mean().backward()
        opt.step()
    return opt


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()
    }


def _reference(name: str, x: torch.Tensor, steps: int = STEPS):
    kw = dict(CASES[name])
    if name != "adalomo":  # adalomo has no work to share under DDP, so no option
        kw["distributed"] = "local"
    model = UnevenNet()
    return model, _train(model, name, kw, x, steps)


def _equality_run(rank: int, world: int, strategy: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    x = _batch()
    out = {}
    for name, kw in CASES.items():
        ref = _full(_reference(name, x)[0])
        for design in ("same", "halves"):
            if design == "halves" and name == "soap":
                continue
            xb = x if design == "same" else x.chunk(world)[rank]
            if strategy == "fsdp":
                model = fsdp2_shard(UnevenNet())
                _train(model, name, kw, xb)
            else:
                model = UnevenNet()
                _train(model, name, kw, xb, wrapper=DistributedDataParallel(model))
            out[name, design] = (ref, _full(model))
    return out


def _check_equal(results: list[dict]) -> None:
    for key, (ref, got) in results[0].items():
        name, design = key
        for n, a in ref.items():
            err = ((a - got[n]).abs().max() / a.abs().max()).item()
            tol = 0.0 if design == "same" and name in EXACT else 1e-6 if design == "same" else 1e-5
            assert err <= tol, f"{name} ({design} batch): {n} differs from the 1-process run by {err:.2e} > {tol}"
        for other in results[1:]:  # the replicas (FSDP2: the gathered parameters) agree
            for n in got:
                assert torch.equal(got[n], other[key][1][n]), f"{name} ({design}): ranks disagree on {n}"


def test_fsdp2_equals_one_process() -> None:
    _check_equal(run_ranks(_equality_run, "fsdp"))


def test_ddp_equals_one_process_and_replicas_agree() -> None:
    _check_equal(run_ranks(_equality_run, "ddp"))


def _comm_run(rank: int, world: int) -> dict:
    x = _batch()
    out = {}
    for name in ("muon", "soap", "apollo"):
        model = fsdp2_shard(UnevenNet())
        opt = _train(model, name, CASES[name], x, steps=2)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        with comm_debug_mode() as mode:
            opt.step()
        out[name] = ({str(k): v for k, v in mode.get_comm_counts().items()}, mode.comm_bytes)
    return out


def test_fsdp2_moves_rows_with_all_to_all_and_gathers_nothing() -> None:
    """A step all-to-alls the off-owner rows out and back; no parameter is all-gathered.

    The expected bytes: for Muon, whose matrices here are a.weight [7, 12], b.weight [12, 7], row
    [1, 12] and cube [3, 4, 12] (flatten_conv), each rank sends the rows it holds of the matrices
    the other owns and the rows the other holds of its own results; so over both ranks the bytes
    sent are twice the off-owner rows (float32).
    """
    results = run_ranks(_comm_run)
    for name in ("muon", "soap", "apollo"):
        for counts, _ in (r[name] for r in results):
            assert not [k for k in counts if "gather" in k], f"{name}: a step all-gathered: {counts}"
            assert counts.get("c10d.alltoall_base_") == 2, f"{name}: expected 2 all-to-alls (out and back), {counts}"
    shapes = [(7, 12), (12, 7), (1, 12), (3, 48)]
    owners, _ = assign_owners([newton_schulz_flops(*s) for s in shapes], shapes, 2)
    off_owner = sum((m - shard_rows(m, 2)[o]) * n for (m, n), o in zip(shapes, owners))
    sent = sum(b["c10d.alltoall_base_"]["sent"] for _, b in (r["muon"] for r in results))
    received = sum(b["c10d.alltoall_base_"]["received"] for _, b in (r["muon"] for r in results))
    assert sent == received == 2 * off_owner * 4


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


def _checkpoint_run(rank: int, world: int, strategy: str, names: tuple[str, ...]) -> dict:
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    def make(seed: int = 0):
        model = UnevenNet(seed)
        if strategy == "fsdp":
            return fsdp2_shard(model), None
        return model, DistributedDataParallel(model)

    x = _batch()
    out = {}
    for name in names:
        _, ref_opt = _reference(name, x, steps=3)
        model, wrapper = make()
        opt = _train(model, name, CASES[name], x, steps=3, wrapper=wrapper)
        saved = _clone(opt.state_dict())  # a collective when state lives on owners
        params = {n: (p.to_local() if isinstance(p, DTensor) else p).clone() for n, p in model.named_parameters()}
        # every state of every parameter is on every rank, whole or a DTensor of the full shape, and equal
        ref_sd = ref_opt.state_dict()
        problems = []
        for i, ref_state in ref_sd["state"].items():
            for key, ref_value in ref_state.items():
                values = saved["state"][i][key]
                pairs = zip(ref_value, values) if isinstance(ref_value, list) else [(ref_value, values)]
                for a, b in pairs:
                    if isinstance(a, torch.Tensor):
                        if isinstance(b, DTensor) != (strategy == "fsdp" and a.ndim > 0):
                            problems.append(f"{name} {i} {key}: {type(b).__name__} (FSDP2: DTensors; DDP: whole)")
                        if isinstance(b, DTensor):
                            if b.placements[0].is_shard() and b.ndim == 0:
                                problems.append(f"{name} {i} {key}: a 0-dim shard")
                            b = b.full_tensor()
                        same = torch.equal(a, b) if name in EXACT else torch.allclose(a, b, rtol=1e-6, atol=1e-12)
                        if not same:
                            problems.append(f"{name} {i} {key}: differs from the 1-process state")
                    elif a != b:
                        problems.append(f"{name} {i} {key}: {a!r} != {b!r}")
        # resume: a fresh model and optimizer load the parameters and the state, 2 more steps == 5 straight
        _train_more(wrapper or model, opt, x)
        model2, wrapper2 = make(seed=5)
        with torch.no_grad():
            for n, p in model2.named_parameters():
                (p.to_local() if isinstance(p, DTensor) else p).copy_(params[n])
        opt2 = build_optimizer(model2, name, **CASES[name])
        opt2.load_state_dict(saved)
        _train_more(wrapper2 or model2, opt2, x)
        a, b = _full(model), _full(model2)
        out[name] = (problems, all(torch.equal(a[n], b[n]) for n in a))
    return out


@pytest.mark.parametrize(("strategy", "names"), [("fsdp", tuple(CASES)), ("ddp", ("soap", "apollo"))])
def test_owner_state_is_portable_and_resumes(strategy: str, names: tuple[str, ...]) -> None:
    """``state_dict()`` has every key of every parameter on every rank, equal to the 1-process state:
    under FSDP2 owner-held state as row-sharded DTensors (sharded state too), under DDP whole tensors
    on every rank; loading it into a fresh optimizer resumes exactly."""
    for rank_result in run_ranks(_checkpoint_run, strategy, names):
        for name, (problems, resumed) in rank_result.items():
            assert not problems, problems
            assert resumed, f"{name}: 3 steps + state_dict + load_state_dict + 2 steps != 5 steps"


# --- the assignment (no processes) --------------------------------------------------------------------

GPT2 = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12


def test_shard_rows_is_dtensors_chunk_rule() -> None:
    for world in range(1, 9):
        for rows in range(20):
            chunks = [len(c) for c in torch.arange(rows).chunk(world)] if rows else []
            assert shard_rows(rows, world) == chunks + [0] * (world - len(chunks)), (rows, world)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_lpt_balances_gpt2_within_one_matrix_of_the_mean(world: int) -> None:
    costs = [newton_schulz_flops(*s) for s in GPT2]
    owners, loads = assign_owners(costs, GPT2, world)
    mean = sum(costs) / world
    assert max(loads) <= mean + max(costs)  # the LPT bound
    assert load_balance(owners, costs, world) == pytest.approx(max(loads) / mean)
    assert sorted(set(owners)) == list(range(world))
    assert owners == assign_owners(costs, GPT2, world)[0]  # deterministic
    assert load_balance(owners, costs, world) < 1.1


def test_lpt_carries_the_load_across_buckets() -> None:
    # bucket A (3 x 10) leaves rank 0 at 20 and rank 1 at 10; bucket B (3 x 5) fills rank 1 first
    owners, loads = assign_owners([5, 10, 5, 10, 5, 10], ["B", "A", "B", "A", "B", "A"], 2)
    assert owners == [1, 0, 1, 1, 0, 0]
    assert loads == [25.0, 20.0]
    # a bucket restarted from zero would give B to ranks 0, 1, 0: loads 30 and 15
    owners, loads = assign_owners([5, 5, 5], ["B"] * 3, 2, loads=[20.0, 10.0])
    assert owners == [1, 1, 0] and loads == [25.0, 20.0]
    # ties go to the lowest rank; bigger buckets first whatever their order
    assert assign_owners([1, 1, 1, 1], None, 4)[0] == [0, 1, 2, 3]
    assert assign_owners([1, 8], ["s", "b"], 2)[0] == [1, 0]


def test_assign_owners_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="world=0"):
        assign_owners([1.0], None, 0)
    with pytest.raises(ValueError, match="1 costs but 2 keys"):
        assign_owners([1.0], ["a", "b"], 2)


def _dcp_save(rank: int, world: int, root: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    x = _batch()
    out = {}
    for name in ("soap", "apollo"):
        model = fsdp2_shard(UnevenNet())
        opt = _train(model, name, CASES[name], x, steps=3)
        dcp.save(
            {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=f"{root}/{name}"
        )
        _train_more(model, opt, x)
        out[name] = _full(model)
    return out


def _train_more(model: nn.Module, opt, x: torch.Tensor, steps: int = 2) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def _dcp_load(rank: int, world: int, root: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    x = _batch()
    out = {}
    for name in ("soap", "apollo"):
        model = fsdp2_shard(UnevenNet(seed=3))
        opt = build_optimizer(model, name, **CASES[name])
        # DCP builds the state to load into with a zero-lr step; owner-held state comes back as row shards
        sd = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(sd, checkpoint_id=f"{root}/{name}")
        model.load_state_dict(sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])
        _train_more(model, opt, x)
        out[name] = _full(model)
    return out


@pytest.mark.parametrize(("save_world", "load_world"), [(2, 1), (1, 2)])
def test_dcp_resumes_owner_state_on_another_world_size(tmp_path, save_world: int, load_world: int) -> None:
    """SOAP's and APOLLO's owner-held state through ``torch.distributed.checkpoint``: saved on one
    world size, loaded on another (the owners change), 3 + 2 steps equal 5 straight."""
    straight = run_ranks(_dcp_save, str(tmp_path), world_size=save_world)[0]
    resumed = run_ranks(_dcp_load, str(tmp_path), world_size=load_world)[0]
    for name, params in straight.items():
        for n, a in params.items():
            assert torch.equal(a, resumed[name][n]), f"{name}: {n} differs after the resume"
