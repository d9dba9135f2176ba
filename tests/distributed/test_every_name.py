"""Every registered name on 2 gloo ranks: FSDP2 shards and DDP replicas equal the 1-process run.

The model (:class:`UnevenNet`) shards unevenly: rows not divisible by the world size, a ``[1, N]``
parameter (one rank holds an empty shard), a 3-D parameter. Each rank computes the loss on the
same full batch, so the averaged gradient equals the 1-process gradient to the last bit and any
difference left is the optimizer's: elementwise optimizers must agree to 1e-7 (relative to the
parameter's largest entry), optimizers with per-tensor statistics to 1e-6.

The matrix optimizers (owner-compute on shards) have their own tests in
``test_matrix_owner_compute.py``; the names in ``REFUSES`` must refuse shards at construction
with a clear error. A name registered later lands in the equality test unless listed here.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from lightning_opt import available_optimizers, build_optimizer, get_optimizer_info
from tests.distributed._harness import UnevenNet, fsdp2_shard, run_ranks

# tested on shards by test_matrix_owner_compute.py (owner-compute of whole matrices)
OWNER_COMPUTE = {"muon", "soap", "apollo", "apollo_mini", "adalomo"}
# names that cannot run on FSDP2 shards, and the error they must raise when the optimizer is built
REFUSES = {
    "adamw_8bit": r"cannot step FSDP2 \(DTensor\) shards.*use the 32-bit 'adamw'",
    "paged_adamw_8bit": r"cannot step FSDP2 \(DTensor\) shards.*use the 32-bit 'adamw'",
    "lion_8bit": r"cannot step FSDP2 \(DTensor\) shards.*use the 32-bit 'lion'",
    "paged_lion_8bit": r"cannot step FSDP2 \(DTensor\) shards.*use the 32-bit 'lion'",
}
# per-tensor statistics (norms, RMS, factored moments) summed over shards: 1e-6
REDUCES = {"lamb", "lars", "stable_adamw", "grokadamw", "adafactor", "lookahead_lamb", "lomo"}

# options that switch on a name's reduction path (LOMO's global-norm clipping)
HPARAMS = {"lomo": {"clip_grad_norm": 0.05}}
STEPS = 5
X = torch.randn(8, 12, generator=torch.Generator().manual_seed(1))


def _loss(model: nn.Module) -> torch.Tensor:
    return (model(X) ** 2).mean()


def _build(name: str, model: nn.Module) -> torch.optim.Optimizer:
    return build_optimizer(
        model, name, lr=get_optimizer_info(name).default_lr * 0.1, weight_decay=0.01, **HPARAMS.get(name, {})
    )


def _train(name: str, model: nn.Module) -> dict[str, torch.Tensor]:
    opt = _build(name, model)
    for _ in range(STEPS):
        opt.zero_grad()
        _loss(model).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _reference(name: str) -> dict[str, torch.Tensor]:
    return _train(name, UnevenNet())


def _fsdp2_rank(rank: int, world_size: int, names: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for name in names:
        model = fsdp2_shard(UnevenNet())
        if name in REFUSES:
            try:
                _build(name, model)
            except Exception as err:  # noqa: BLE001 - the message is checked in the test
                out[name] = f"{type(err).__name__}: {err}"
            else:
                out[name] = "built"
            continue
        _train(name, model)
        out[name] = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
    return out


def _ddp_rank(rank: int, world_size: int, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for name in names:
        model = DDP(UnevenNet())
        params = _train(name, model)
        out[name] = {n.removeprefix("module."): p for n, p in params.items()}
    return out


def _assert_close(name: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    tol = 1e-6 if name in REDUCES else 1e-7
    for key, w in want.items():
        err = ((got[key] - w).abs().max() / w.abs().max().clamp_min(1e-30)).item()
        assert err <= tol, f"{name}: {key} differs from the 1-process run by {err:.2e} (relative), over {tol:g}"


SHARDED = [n for n in available_optimizers() if n not in OWNER_COMPUTE]


def test_fsdp2_every_name_equals_unsharded_or_refuses() -> None:
    results = run_ranks(_fsdp2_rank, SHARDED)
    for name in SHARDED:
        got = results[0][name]
        if name in REFUSES:
            assert isinstance(got, str) and got != "built", f"{name} built on shards; it must refuse them"
            assert re.search(REFUSES[name], got), f"{name}: unclear refusal: {got}"
            assert not re.search(r"mixed torch.Tensor and DTensor|sharding strategy", got), got
            continue
        _assert_close(name, got, _reference(name))


def test_ddp_every_name_identical_replicas_equal_one_process() -> None:
    names = available_optimizers()
    results = run_ranks(_ddp_rank, names)
    for name in names:
        for key, value in results[0][name].items():
            assert torch.equal(value, results[1][name][key]), f"{name}: replicas differ in {key}"
        _assert_close(name, results[0][name], _reference(name))


def _count_rank(rank: int, world_size: int, names: list[str]) -> dict[str, tuple[int, int, int]]:
    from torch.distributed.tensor.debug import CommDebugMode

    out = {}
    for name in names:
        torch.manual_seed(0)
        model = fsdp2_shard(nn.Sequential(*[nn.Linear(9, 9) for _ in range(6)]))
        opt = build_optimizer(model, name, lr=1e-3, weight_decay=0.1, **HPARAMS.get(name, {}))
        model(torch.randn(4, 9)).sum().backward()
        with CommDebugMode() as comm:
            opt.step()
        counts = {str(k): v for k, v in comm.get_comm_counts().items()}
        n_reduce = sum(v for k, v in counts.items() if "allreduce" in k or "all_reduce" in k)
        out[name] = (n_reduce, sum(counts.values()), len(opt.param_groups))
        if "fused" in getattr(opt, "impls", ()):  # the fused kernel reduces inside: it cannot see other shards
            fused = build_optimizer(model, name, lr=1e-3, weight_decay=0.1, impl="fused", **HPARAMS.get(name, {}))
            try:
                fused.step()
            except RuntimeError as err:
                out[name] += (str(err),)
    return out


@pytest.mark.parametrize("world_size", [2])
def test_fsdp2_reductions_are_coalesced(world_size: int) -> None:
    """12 parameters in 2 groups: per-tensor statistics cost at most one all-reduce per group (plus
    LAMB's global clip), never one per parameter, and no other collective."""
    names = sorted(REDUCES - {"lookahead_lamb"})
    results = run_ranks(_count_rank, names, world_size=world_size)
    for name, (n_reduce, n_total, n_groups, *fused) in results[0].items():
        assert n_total == n_reduce, f"{name}: collectives other than all-reduce in the step"
        assert 1 <= n_reduce <= n_groups + 1, f"{name}: {n_reduce} all-reduces for 12 parameters in {n_groups} groups"
        if "fused" in getattr(get_optimizer_info(name).cls, "impls", ()):
            assert fused and "cannot see the other shards" in fused[0], f"{name}(impl='fused') stepped shards"
