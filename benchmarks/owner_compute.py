"""Owner-compute benchmark: what the matrix optimizers move per step, how evenly they split, how fast.

    python benchmarks/owner_compute.py [--steps 20] [--rounds 3]

Prints three markdown tables (results go in docs/BENCHMARKS.md; nothing is asserted):

(a) bytes communicated per optimizer step per rank for Muon and SOAP on 2 gloo ranks under FSDP2
    (``fully_shard``), measured with ``lightning_opt.optim.distributed.comm_debug_mode`` (torch's
    ``CommDebugMode`` plus byte counts), on a small GPT-shaped set (d=128, 2 layers, embeddings
    excluded), next to what all-gathering every matrix on every rank would move and the model's
    ``2 (W-1) P / W^2``; and the DDP broadcast volume for the same set.
(b) the load balance (largest rank's matrix work over the mean) of the LPT assignment on
    GPT-2 124M's matrices (12 x qkv [2304, 768], proj [768, 768], fc [3072, 768], fc2 [768, 3072])
    for 2, 4 and 8 ranks, for Muon's and SOAP's cost models, next to round-robin; computed
    without processes.
(c) the per-rank Muon step time on 1 process and on 2 DDP processes (gloo), each process one
    thread, on a d=256, 4-layer GPT-shaped set; also the 1-process time with 2 threads (the whole
    2-core machine).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import date

import torch

# imported before forking the ranks, not in each
import torch._dynamo
import torch.distributed.tensor
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lightning_opt.optim.distributed import assign_owners, comm_debug_mode, load_balance, shard_rows
from lightning_opt.optim.muon import Muon, newton_schulz_flops
from lightning_opt.optim.soap import SOAP, soap_cost, soap_layout
from tests.distributed._harness import run_ranks

GPT2_124M = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12


def gpt_shapes(d: int, layers: int) -> list[tuple[int, int]]:
    """The hidden matrices of a GPT block stack: qkv, attention out, MLP in and out."""
    return [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * layers


class Matrices(nn.Module):
    """Bias-free linear layers of the given (out, in) shapes; ``forward`` touches each once."""

    def __init__(self, shapes: list[tuple[int, int]], seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(n, m, bias=False) for m, n in shapes)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return sum(layer(x).pow(2).mean() for layer, x in zip(self.layers, xs))


def _inputs(shapes: list[tuple[int, int]], batch: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, n, generator=g) for _, n in shapes]


def _make(name: str, params) -> torch.optim.Optimizer:
    if name == "muon":
        return Muon(params, lr=0.02, ns_dtype="float32")
    return SOAP(params, lr=3e-3, precondition_frequency=2)


def _bytes_rank(rank: int, world: int, shapes: list[tuple[int, int]], strategy: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    xs = _inputs(shapes)
    out = {}
    for name in ("muon", "soap"):
        model = Matrices(shapes)
        forward = model
        if strategy == "fsdp":
            for layer in model.layers:
                from torch.distributed.fsdp import fully_shard

                fully_shard(layer)
            fully_shard(model)
        else:
            forward = DistributedDataParallel(model)
        opt = _make(name, list(model.named_parameters()))
        for step in range(3):  # SOAP's first step only builds its preconditioners
            opt.zero_grad()
            forward(xs).backward()
            if step < 2:
                opt.step()
        with comm_debug_mode() as mode:
            opt.step()
        out[name] = ({str(k): v for k, v in mode.get_comm_counts().items()}, mode.comm_bytes)
    return out


def table_bytes() -> str:
    shapes = gpt_shapes(128, 2)
    world = 2
    P = sum(m * n for m, n in shapes)
    fsdp = run_ranks(_bytes_rank, shapes, "fsdp", world_size=world)
    ddp = run_ranks(_bytes_rank, shapes, "ddp", world_size=world)
    gather_in = [sum((m - shard_rows(m, world)[r]) * n for m, n in shapes) * 4 for r in range(world)]
    lines = [
        (
            f"Set: {len(shapes)} matrices of a d=128, 2-layer GPT (qkv, proj, fc, fc2), P = {P:,} float32 elements "
            f"({P * 4 / 2**20:.2f} MiB); {world} gloo ranks; one optimizer step after warm-up."
        ),
        "",
        (
            "| optimizer | strategy | rank | collectives in the step | sent (KiB) | received (KiB) "
            "| full all-gather would receive (KiB) | model 2(W-1)P/W^2 (KiB) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    model_kib = 2 * (world - 1) * P / world**2 * 4 / 1024
    for strategy, results in (("FSDP2", fsdp), ("DDP", ddp)):
        for name in ("muon", "soap"):
            for rank, r in enumerate(results):
                counts, by_op = r[name]
                sent = sum(v["sent"] for v in by_op.values())
                received = sum(v["received"] for v in by_op.values())
                ops = ", ".join(f"{k.split('.')[-1]} x{v}" for k, v in sorted(counts.items())) or "none"
                gather = f"{gather_in[rank] / 1024:.1f}" if strategy == "FSDP2" else "-"
                model = f"{model_kib:.1f}" if strategy == "FSDP2" else "-"
                lines.append(
                    f"| {name} | {strategy} | {rank} | {ops} | {sent / 1024:.1f} | {received / 1024:.1f} "
                    f"| {gather} | {model} |"
                )
    return "\n".join(lines)


def predicted_bytes(shapes: list[tuple[int, int]], world: int, costs: list[float]) -> list[int]:
    """Bytes each rank sends per step under FSDP2 owner-compute (float32; it receives as many in all).

    Rank ``r`` sends its rows of every matrix owned elsewhere, and the other ranks' rows of the
    results of the matrices it owns.
    """
    owners, _ = assign_owners(costs, shapes, world)
    sent = [0] * world
    for (m, n), o in zip(shapes, owners):
        rows = shard_rows(m, world)
        for r in range(world):
            sent[r] += (m - rows[r]) * n if r == o else rows[r] * n
    return [4 * s for s in sent]


def table_predicted() -> str:
    P = sum(m * n for m, n in GPT2_124M)
    lines = [
        (
            f"GPT-2 124M hidden matrices (P = {P / 1e6:.1f}M float32), Muon's owners; the formula the 2-rank "
            "measurement above matches exactly, evaluated for more ranks (no processes)."
        ),
        "",
        (
            "| ranks | owner-compute: most any rank sends (MiB) | same received | full all-gather: each rank "
            "receives (MiB) | ratio |"
        ),
        "|---|---|---|---|---|",
    ]
    costs = [newton_schulz_flops(m, n) for m, n in GPT2_124M]
    for world in (2, 4, 8):
        sent = predicted_bytes(GPT2_124M, world, costs)
        gather = max(sum((m - shard_rows(m, world)[r]) * n for m, n in GPT2_124M) * 4 for r in range(world))
        lines.append(
            f"| {world} | {max(sent) / 2**20:.1f} | (sum over ranks equal) | {gather / 2**20:.1f} | "
            f"{max(sent) / gather:.2f} |"
        )
    return "\n".join(lines)


def table_balance() -> str:
    lines = [
        "GPT-2 124M hidden matrices (48; embeddings excluded). Load balance = largest rank's work / mean.",
        "",
        "| ranks | Muon LPT | Muon round-robin | SOAP LPT | SOAP round-robin | matrices per rank (Muon LPT) |",
        "|---|---|---|---|---|---|",
    ]
    muon_costs = [newton_schulz_flops(m, n) for m, n in GPT2_124M]
    soap_costs = []
    for m, n in GPT2_124M:
        shape, rotated = soap_layout((m, n), max_precond_dim=10000, merge_dims=False, precondition_1d=False)
        soap_costs.append(soap_cost(shape, rotated, 10))
    for world in (2, 4, 8):
        row = [str(world)]
        for costs in (muon_costs, soap_costs):
            owners, _ = assign_owners(costs, GPT2_124M, world)
            row.append(f"{load_balance(owners, costs, world):.4f}")
            row.append(f"{load_balance([i % world for i in range(len(costs))], costs, world):.4f}")
            if costs is muon_costs:
                counts = [owners.count(r) for r in range(world)]
        lines.append("| " + " | ".join(row) + f" | {counts} |")
    return "\n".join(lines)


def _time_rank(rank: int, world: int, shapes: list[tuple[int, int]], steps: int, rounds: int, threads: int):
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(threads)
    model = Matrices(shapes)
    forward = DistributedDataParallel(model) if world > 1 else model
    opt = Muon(
        list(model.named_parameters()), lr=0.02, ns_dtype="float32", distributed="auto" if world > 1 else "local"
    )
    xs = _inputs(shapes)
    opt.zero_grad()
    forward(xs).backward()
    opt.step()  # warm-up
    best = []
    import torch.distributed as dist

    for _ in range(rounds):
        if world > 1:
            dist.barrier()
        t, c = time.perf_counter(), time.process_time()
        for _ in range(steps):
            opt.step()  # the same gradients every step: the optimizer step alone
        best.append(((time.perf_counter() - t) / steps, (time.process_time() - c) / steps))
    return min(best)


def table_time(steps: int, rounds: int) -> str:
    shapes = gpt_shapes(128, 4)
    P = sum(m * n for m, n in shapes)
    one = run_ranks(_time_rank, shapes, steps, rounds, 1, world_size=1)[0]
    two = run_ranks(_time_rank, shapes, steps, rounds, 1, world_size=2)
    # here, not in a forked child: OpenMP's thread pool does not survive fork
    threads = torch.get_num_threads()
    one2 = _time_rank(0, 1, shapes, steps, rounds, 2)
    torch.set_num_threads(threads)
    lines = [
        (
            f"Set: {len(shapes)} matrices of a d=128, 4-layer GPT, P = {P / 1e6:.2f}M; float32 Newton-Schulz; best of "
            f"{rounds} rounds of {steps} steps (optimizer step only, fixed gradients). CPU = the process's CPU "
            "time per step: the work it did, whatever else shares the machine."
        ),
        "",
        "| processes | threads each | per-rank Muon step, wall (ms) | per-rank CPU (ms) |",
        "|---|---|---|---|",
        f"| 1 | 1 | {one[0] * 1e3:.1f} | {one[1] * 1e3:.1f} |",
        f"| 1 | 2 | {one2[0] * 1e3:.1f} | {one2[1] * 1e3:.1f} |",
        (
            f"| 2 (DDP, owner-compute) | 1 | {statistics.mean(t[0] for t in two) * 1e3:.1f} "
            f"| {statistics.mean(t[1] for t in two) * 1e3:.1f} (ranks: {', '.join(f'{t[1] * 1e3:.1f}' for t in two)}) |"
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(
        f"# owner-compute, {date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}\n"
    )
    print("## (a) bytes per step per rank\n")
    print(table_bytes())
    print()
    print(table_predicted())
    print("\n## (b) load balance\n")
    print(table_balance())
    print("\n## (c) Muon step time\n")
    print(table_time(args.steps, args.rounds))


if __name__ == "__main__":
    main()
