"""Run a function on W CPU processes (gloo) and collect what each rank returns.

``run_ranks(fn, *args, world_size=2)`` forks ``world_size`` processes, initialises a gloo process
group through a file store in a fresh temporary directory, calls ``fn(rank, world_size, *args)`` in
each, and returns the list of per-rank results (anything ``torch.save`` can write). An exception in a
rank is re-raised in the test with that rank's traceback; a rank that hangs is killed after
``timeout`` seconds. ``fn`` must be a module-level function (it is looked up by the child after fork,
so lambdas work too, but results must be picklable).

Fork (not spawn) keeps a start at ~0.1 s instead of re-importing torch in every child; each child
runs with one intra-op thread so two ranks share the 2-core CI machine without oversubscription.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["UnevenNet", "fsdp2_shard", "lightning_env", "run_ranks"]


def _child(fn: Callable[..., Any], rank: int, world_size: int, root: str, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    out = os.path.join(root, f"rank{rank}.pt")
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{os.path.join(root, 'store')}", rank=rank, world_size=world_size
        )
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        torch.save({"ok": True, "result": result}, out)
    except BaseException:  # noqa: BLE001 - everything goes back to the test
        torch.save({"ok": False, "error": traceback.format_exc()}, out)
        os._exit(1)
    os._exit(0)


def lightning_env(rank: int, world_size: int) -> None:
    """The environment a Lightning Trainer inside :func:`run_ranks` reads: it then takes this rank's
    place in the already initialized process group instead of launching processes itself."""
    os.environ.update(
        WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0", MASTER_ADDR="127.0.0.1"
    )
    os.environ.setdefault("MASTER_PORT", "29500")


def run_ranks(fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout: float = 180.0) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the per-rank results."""
    root = tempfile.mkdtemp(prefix="lo-dist-")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, root, args)) for r in range(world_size)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results, errors = [], []
        for r in range(world_size):
            path = os.path.join(root, f"rank{r}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {r}: " + ("timed out" if r in hung else f"died (exit code {procs[r].exitcode})"))
                continue
            rec = torch.load(path, weights_only=False)
            if rec["ok"]:
                results.append(rec["result"])
            else:
                errors.append(f"rank {r}:\n{rec['error']}")
        if errors:
            raise RuntimeError("distributed run failed\n" + "\n".join(errors))
        return results
    finally:
        shutil.rmtree(root, ignore_errors=True)


class UnevenNet(nn.Module):
    """A tiny model whose parameters shard unevenly over 2 ranks.

    ``a.weight`` [7, 12]: rows not divisible by the world size; ``b.weight`` [12, 7]; ``row`` [1, 12]:
    fewer rows than ranks (one rank holds an empty shard); ``cube`` [3, 4, 12]: a 3-D parameter;
    ``a.bias`` [7]: a vector. Every parameter gets a gradient from ``forward``.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Linear(12, 7)
        self.b = nn.Linear(7, 12, bias=False)
        self.row = nn.Parameter(torch.empty(1, 12))
        self.cube = nn.Parameter(torch.empty(3, 4, 12))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        y = self.b(h) + x * self.row
        return y + torch.einsum("bk,ijk->bij", y, self.cube).mean(dim=(1, 2)).unsqueeze(-1)


def fsdp2_shard(model: nn.Module) -> nn.Module:
    """``fully_shard`` every direct child with parameters, then the root (as Lightning users do per block)."""
    from torch.distributed.fsdp import fully_shard

    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child)
    fully_shard(model)
    return model
