"""The shard service of ``optim/precision.py`` on 2 gloo ranks: the placement check (``shard_split``,
``shard_groups``) and the coalesced reductions (``all_reduce_coalesced``, ``run_reduction_rounds``).

Adafactor's and AdaLomo's FSDP2 tests prove the reductions inside a step (results and the count of
all-reduces); here the errors of the placement check, mixed dtypes in one call, and generators that
stop after different numbers of rounds.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.distributed._harness import run_ranks


def _error(fn, *args) -> str:
    try:
        fn(*args)
    except NotImplementedError as err:
        return str(err)
    return "no error"


def _rank(rank: int, world_size: int) -> dict[str, object]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    from lightning_opt.optim.precision import all_reduce_coalesced, run_reduction_rounds, shard_groups, shard_split

    out: dict[str, object] = {}
    mesh = init_device_mesh("cpu", (world_size,))
    x = torch.ones(2, 3)
    out["plain"] = shard_split("Opt", x)
    out["replicated"] = shard_split("Opt", DTensor.from_local(x, mesh, [Replicate()], run_check=False))
    dim, group = shard_split("Opt", DTensor.from_local(x, mesh, [Shard(1)], run_check=False))
    out["shard1"] = (dim, group is mesh.get_group(0))
    partial = DTensor.from_local(x, mesh, [Partial()], run_check=False)
    out["partial_split"] = _error(shard_split, "Opt", partial)
    out["partial_groups"] = _error(shard_groups, "Opt", partial)
    mesh2 = init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("dp", "tp"))
    out["two_dims"] = _error(shard_split, "Opt", DTensor.from_local(x, mesh2, [Shard(0), Shard(1)], run_check=False))
    # Adafactor refuses such a layout when it is built, not at its first step
    from lightning_opt.optim.adafactor import Adafactor

    w = torch.nn.Parameter(DTensor.from_local(x.clone(), mesh2, [Shard(0), Shard(1)], run_check=False))
    out["adafactor_built"] = _error(Adafactor, [w])

    # one all-reduce per dtype; every tensor summed in place, shapes kept
    a, b = torch.full((2, 2), rank + 1.0), torch.tensor([rank * 1.0], dtype=torch.float64)
    c = torch.arange(3.0) * (rank + 1)
    calls = []
    real = dist.all_reduce
    dist.all_reduce = lambda t, **kw: (calls.append(t.dtype), real(t, **kw))[1]
    try:
        all_reduce_coalesced([(group, a), (group, b), (group, c)])
        out["coalesced"] = (a.clone(), b.clone(), c.clone(), list(calls))
        calls.clear()
        # one tensor over the two dims of a 2-D mesh (GradientMonitor's Shard, Shard rows): summed over each once
        d = torch.tensor([rank + 1.0])
        all_reduce_coalesced([(mesh2.get_group(0), d), (mesh2.get_group(1), d)])
        out["two_groups"] = (d.clone(), len(calls))
        calls.clear()

        # generators of 2, 1 and 0 rounds: the rounds' pairs go together, an empty round issues nothing
        seen = []

        def rounds(n: int, value: float):
            t = torch.tensor([value])
            for _ in range(n):
                yield [(group, t)]
                seen.append((n, t.item()))
                t = t * 2

        run_reduction_rounds([rounds(2, 1.0), rounds(1, 10.0), rounds(0, 0.0)])
        out["rounds"] = (seen, list(calls))
    finally:
        dist.all_reduce = real
    return out


def test_placement_check_and_coalesced_rounds_on_2_ranks() -> None:
    results = run_ranks(_rank)
    for r in results:
        assert r["plain"] is None and r["replicated"] is None
        assert r["shard1"] == (1, True)
        for key in ("partial_split", "partial_groups"):
            assert "Opt steps sharded or replicated DTensors" in r[key] and "partial sum" in r[key], r[key]
        assert "Opt steps DTensors split along one mesh dim" in r["two_dims"], r["two_dims"]
        assert "Adafactor steps DTensors split along one mesh dim" in r["adafactor_built"], r["adafactor_built"]
        a, b, c, calls = r["coalesced"]
        assert torch.equal(a, torch.full((2, 2), 3.0))
        assert torch.equal(b, torch.tensor([1.0], dtype=torch.float64))
        assert torch.equal(c, torch.arange(3.0) * 3)
        assert calls == [torch.float32, torch.float64]
        d, n_calls = r["two_groups"]
        assert torch.equal(d, torch.tensor([3.0])) and n_calls == 2
        seen, calls = r["rounds"]
        # round 1: 2*1 and 2*10 reduced together; round 2: 2*(2*2) alone
        assert seen == [(2, 2.0), (1, 20.0), (2, 8.0)]
        assert calls == [torch.float32, torch.float32]
