"""Step time and state memory of every registered optimizer on one weight matrix, with peers.

    python benchmarks/optimizer_step.py [--size 1024] [--rounds 7] [--only adamw,muon]

A model of two ``size x size`` hidden weights (``blocks.N.weight``, so matrix optimizers treat them
as hidden layers) gets a fixed random gradient; every optimizer takes ``--warmup`` steps, then the
optimizers take one timed step each in turn, ``--rounds`` times (interleaved, so a slow phase of a
shared machine hits them alike). Prints a markdown table of median milliseconds per step, the ratio
to torch's AdamW (foreach=False, the CPU default path), and optimizer-state bytes per parameter.
Peers (torch's own implementations and the reference packages, where installed) run in the same
process. Not a test: nothing is asserted. Results go in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date

import torch
from torch import nn

from lightning_opt import available_optimizers, build_optimizer, get_optimizer_info


class _Model(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(size, size, bias=False) for _ in range(2))


def _peers() -> dict[str, Callable[[list], torch.optim.Optimizer]]:
    peers: dict[str, Callable] = {
        "torch AdamW (for-loop)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False),
        "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "torch AdamW (fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "torch Muon": lambda ps: torch.optim.Muon(ps, lr=0.02),
    }
    try:
        import lion_pytorch

        peers["lion_pytorch Lion"] = lambda ps: lion_pytorch.Lion(ps, lr=1e-4)
    except ImportError:
        pass
    try:
        import optimi

        peers["optimi StableAdamW"] = lambda ps: optimi.StableAdamW(ps, lr=1e-3)
    except ImportError:
        pass
    try:
        import schedulefree

        def _sf(ps: list) -> torch.optim.Optimizer:
            opt = schedulefree.AdamWScheduleFree(ps, lr=2.5e-3)
            opt.train()
            return opt

        peers["schedulefree AdamW"] = _sf
    except ImportError:
        pass
    try:
        import pytorch_optimizer

        peers["pytorch_optimizer SOAP"] = lambda ps: pytorch_optimizer.SOAP(ps, lr=3e-3)
        peers["pytorch_optimizer Lamb"] = lambda ps: pytorch_optimizer.Lamb(ps, lr=1e-3)
    except ImportError:
        pass
    return peers


def _state_bytes(opt: torch.optim.Optimizer, n_params: int) -> float:
    seen: set[int] = set()
    total = 0

    def add(v: object) -> None:
        nonlocal total
        if isinstance(v, torch.Tensor) and id(v) not in seen and v.numel() > 1:
            seen.add(id(v))
            total += v.numel() * v.element_size()
        elif isinstance(v, dict):
            for x in v.values():
                add(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                add(x)

    add(dict(getattr(opt, "optimizer", opt).state))
    return total / n_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated registry names (default: all)")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or available_optimizers()

    runs: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    torch.manual_seed(0)
    grads = [torch.randn(args.size, args.size) * 1e-2 for _ in range(2)]
    for label, make in _peers().items():
        model = _Model(args.size)
        runs[label] = (model, make(list(model.parameters())))
    for name in names:
        model = _Model(args.size)
        wd = 0.1 if name in ("lamb", "lars", "lookahead_lamb") else 0.0  # trust ratio only on wd groups
        try:
            runs[name] = (model, build_optimizer(model, name, lr=get_optimizer_info(name).default_lr, weight_decay=wd))
        except Exception as err:  # report every name, failed ones too
            print(f"{name}: {type(err).__name__}: {err}")

    def step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        opt.step()

    times: dict[str, list[float]] = {k: [] for k in runs}
    for model, opt in runs.values():
        for _ in range(args.warmup):
            step(model, opt)
    for r in range(args.rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for label in order:
            model, opt = runs[label]
            start = time.perf_counter()
            step(model, opt)
            times[label].append(time.perf_counter() - start)

    base = statistics.median(times["torch AdamW (for-loop)"])
    n = 2 * args.size * args.size
    print(f"\n2 x {args.size}x{args.size} fp32 weights; {platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {date.today()}; median of {args.rounds} interleaved steps\n")
    print("| optimizer | ms/step | vs torch AdamW (for-loop) | state bytes/param |")
    print("|---|---|---|---|")
    for label, ts in times.items():
        med = statistics.median(ts)
        print(f"| {label} | {med * 1e3:.2f} | {med / base:.2f} | {_state_bytes(runs[label][1], n):.2f} |")


if __name__ == "__main__":
    main()
