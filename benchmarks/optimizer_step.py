"""Step time of our optimizers, every impl, against their peers on a 25.19M-parameter set (issue 7).

    python benchmarks/optimizer_step.py [--only lion,adamw] [--rounds 7] [--threads 2] [--scale 1.0]

The set: 24 weight matrices of 1024 x 1024 (named ``blocks.N.weight``: hidden layers for Muon) and
24 vectors of 1024 (``blocks.N.bias``), float32 on the CPU: 25,190,400 parameters. ``--scale s``
shrinks the side to ``1024 * sqrt(s)`` (about ``s`` times as many parameters; for smoke tests).

One suite per algorithm: each of our impls (``for_loop``, ``foreach``, ``fused``, ``auto``; Triton
runs only on CUDA, or in its interpreter, so it has no row here), the peers that implement the
algorithm (torch's own classes and the reference packages, in this process) and torch's fused
AdamW as the yardstick. Each run takes a first step, timed on its own (state allocation,
torch.compile / JIT, kernel builds: the one-off cost), and one warm-up step; then every run takes
one step per round, the order reversed every round, ``--rounds`` rounds, so a slow phase of a
shared machine hits all alike. The runs of a suite share the parameter tensors (the values do not
change the speed of these steps) and see the same gradients, restored before every step. One
suite at a time is in memory.

Columns: median ms/step; the bytes per parameter a step must move at least (float32, stated per
algorithm in the notes); the ratio to the fastest peer of the same algorithm (same suite); time per
byte relative to torch's fused AdamW in the same suite (28 B/param), so below 1 beats torch's fused
kernel per byte moved. Muon is matmul-bound: its rows give the Newton-Schulz GFLOP per step and
the orthogonality error ``max |sigma_i - 1|`` of the update each implementation applies to one
matrix (ours and torch's: the same quintic, the error is the iteration's, ~0.3 by design).
Not a test: nothing is asserted. Results go in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch
from torch import Tensor

from lightning_opt import build_optimizer, get_optimizer_info

Named = list[tuple[str, Tensor]]
Factory = Callable[[Named, float, float], Any]  # (named params, lr, weight_decay) -> object with .step()

WD = 0.01  # every run decays (LAMB/LARS adapt only decayed groups; the decay paths run)
N_LAYERS = 24
YARDSTICK = "torch AdamW (fused)"
YARDSTICK_BYTES = 28.0


def _plain(named: Named) -> list[Tensor]:
    return [p for _, p in named]


class _Hybrid:
    """torch's Muon on the matrices and torch's AdamW on the rest, stepped together."""

    def __init__(self, named: Named, lr: float, wd: float) -> None:
        mats = [p for n, p in named if p.ndim == 2]
        vecs = [p for n, p in named if p.ndim != 2]
        # our Muon's defaults: Keller's AdamW side (lr 3e-4 at Muon's 0.02, betas (0.9, 0.95), eps 1e-10)
        self.optimizers = [torch.optim.Muon(mats, lr=lr, weight_decay=wd)]
        if vecs:
            self.optimizers.append(
                torch.optim.AdamW(vecs, lr=lr * 3e-4 / 0.02, betas=(0.9, 0.95), eps=1e-10, weight_decay=wd, fused=True)
            )

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()


def _train_mode(opt: Any) -> Any:
    opt.train()  # schedule-free optimizers step only in train mode
    return opt


def _peer_factories() -> dict[str, list[tuple[str, Factory, float | None]]]:
    """Per algorithm: (label, factory, bytes/param if not the algorithm's). Missing packages are skipped."""
    peers: dict[str, list[tuple[str, Factory, float | None]]] = {k: [] for k in ALGOS}
    peers["adamw"] += [
        (YARDSTICK, lambda n, lr, wd: torch.optim.AdamW(_plain(n), lr=lr, weight_decay=wd, fused=True), None),
        ("torch AdamW (for-loop, torch's CPU default)", lambda n, lr, wd: torch.optim.AdamW(_plain(n), lr=lr, weight_decay=wd, foreach=False), None),
        ("torch AdamW (foreach)", lambda n, lr, wd: torch.optim.AdamW(_plain(n), lr=lr, weight_decay=wd, foreach=True), None),
    ]
    peers["muon"].append(("torch Muon + torch AdamW (fused) on the vectors", _Hybrid, None))
    try:
        import optimi

        # triton=False: with triton installed and no GPU driver optimi picks Triton and crashes
        peers["adamw"].append(("optimi AdamW", lambda n, lr, wd: optimi.AdamW(_plain(n), lr=lr, weight_decay=wd, triton=False), None))
        peers["lion"].append(("optimi Lion", lambda n, lr, wd: optimi.Lion(_plain(n), lr=lr, weight_decay=wd, triton=False), None))
        peers["stable_adamw"].append(
            ("optimi StableAdamW", lambda n, lr, wd: optimi.StableAdamW(_plain(n), lr=lr, weight_decay=wd, triton=False), None)
        )
    except ImportError:
        pass
    try:
        import lion_pytorch

        peers["lion"].append(("lion-pytorch Lion", lambda n, lr, wd: lion_pytorch.Lion(_plain(n), lr=lr, weight_decay=wd), None))
    except ImportError:
        pass
    try:
        import schedulefree

        peers["schedule_free_adamw"].append(
            ("schedulefree AdamWScheduleFree", lambda n, lr, wd: _train_mode(schedulefree.AdamWScheduleFree(_plain(n), lr=lr, weight_decay=wd)), None)
        )
    except ImportError:
        pass
    try:
        import heavyball

        # heavyball compiles its steps with torch.compile: the first step holds the compile time
        peers["adamw"].append(("heavyball AdamW (torch.compile)", lambda n, lr, wd: heavyball.AdamW(_plain(n), lr=lr, weight_decay=wd), None))
        peers["schedule_free_adamw"].append(
            ("heavyball SFAdamW (torch.compile)", lambda n, lr, wd: heavyball.SFAdamW(_plain(n), lr=lr, weight_decay=wd), None)
        )
        peers["muon"].append(("heavyball MuonAdamW (torch.compile)", lambda n, lr, wd: heavyball.MuonAdamW(_plain(n), lr=lr, weight_decay=wd), None))
    except ImportError:
        pass
    try:
        import pytorch_optimizer as po

        peers["lion"].append(("pytorch_optimizer Lion", lambda n, lr, wd: po.Lion(_plain(n), lr=lr, weight_decay=wd), None))
        peers["stable_adamw"].append(("pytorch_optimizer StableAdamW", lambda n, lr, wd: po.StableAdamW(_plain(n), lr=lr, weight_decay=wd), None))
        peers["schedule_free_adamw"].append(
            ("pytorch_optimizer ScheduleFreeAdamW", lambda n, lr, wd: _train_mode(po.ScheduleFreeAdamW(_plain(n), lr=lr, weight_decay=wd)), None)
        )
        peers["lamb"].append(("pytorch_optimizer Lamb", lambda n, lr, wd: po.Lamb(_plain(n), lr=lr, weight_decay=wd), None))
        peers["lars"].append(("pytorch_optimizer LARS", lambda n, lr, wd: po.LARS(_plain(n), lr=lr, weight_decay=wd), None))
    except ImportError:
        pass
    try:
        import bitsandbytes as bnb

        peers["adamw"] += [
            ("bitsandbytes AdamW32bit", lambda n, lr, wd: bnb.optim.AdamW32bit(_plain(n), lr=lr, weight_decay=wd), None),
            # 8-bit m, v: reads p, g (8) and m, v (2), writes p (4) and m, v (2); vectors under 4096 stay 32-bit
            ("bitsandbytes AdamW8bit", lambda n, lr, wd: bnb.optim.AdamW8bit(_plain(n), lr=lr, weight_decay=wd), 16.0),
        ]
        peers["lion"] += [
            ("bitsandbytes Lion32bit", lambda n, lr, wd: bnb.optim.Lion32bit(_plain(n), lr=lr, weight_decay=wd), None),
            ("bitsandbytes Lion8bit", lambda n, lr, wd: bnb.optim.Lion8bit(_plain(n), lr=lr, weight_decay=wd), 14.0),
        ]
        peers["lamb"].append(("bitsandbytes LAMB32bit", lambda n, lr, wd: bnb.optim.LAMB32bit(_plain(n), lr=lr, weight_decay=wd), None))
        peers["lars"].append(
            ("bitsandbytes LARS32bit", lambda n, lr, wd: bnb.optim.LARS32bit(_plain(n), lr=lr, momentum=0.9, weight_decay=wd), None)
        )
    except ImportError:
        pass
    try:
        import grokadamw

        peers["grokadamw"].append(("grokadamw GrokAdamW", lambda n, lr, wd: grokadamw.GrokAdamW(_plain(n), lr=lr, weight_decay=wd), None))
    except ImportError:
        pass
    try:
        import sophia_opt

        peers["sophia"].append(("sophia-opt SophiaG", lambda n, lr, wd: sophia_opt.SophiaG(_plain(n), lr=lr, weight_decay=wd), None))
    except ImportError:
        pass
    return peers


@dataclass(frozen=True)
class Algo:
    """One algorithm: its registry name and the bytes per parameter a step must move at least."""

    bytes: float | None
    note: str


ALGOS: dict[str, Algo] = {
    "adamw": Algo(28.0, "reads p, g, m, v; writes p, m, v"),
    "lion": Algo(20.0, "reads p, g, m; writes p, m"),
    "stable_adamw": Algo(36.0, "a pass reading g, v for the per-tensor RMS (8), then AdamW's 28"),
    "schedule_free_adamw": Algo(28.0, "reads y, g, z, v; writes y, z, v"),
    "lamb": Algo(44.0, "grad-norm pass reads g (4); pass 1 reads p, g, m, v, writes m, v (24); pass 2 reads p, m, v, writes p (16)"),
    "lars": Algo(28.0, "norm pass reads p, g (8); reads p, g, buf, writes p, buf (20)"),
    "sophia": Algo(24.0, "reads p, g, m, h; writes p, m (the Hessian EMA is refreshed every k steps by a hook, not here)"),
    "grokadamw": Algo(40.0, "clip-norm pass reads g (4); reads p, g, m, v, ema; writes p, m, v, ema (36)"),
    "muon": Algo(None, "matmul-bound: 5 Newton-Schulz steps per matrix; vectors take AdamW (28 B)"),
}
OUR_IMPL_ORDER = ("for_loop", "foreach", "fused", "auto")


@dataclass
class Run:
    label: str
    kind: str  # "ours", "peer" or "yardstick"
    make: Factory
    bytes: float | None
    opt: Any = None
    first_ms: float | None = None
    times: list[float] = field(default_factory=list)
    error: str | None = None
    ortho: float | None = None

    @property
    def ms(self) -> float | None:
        return statistics.median(self.times) * 1e3 if self.times else None


def _param_set(side: int) -> tuple[Named, list[Tensor]]:
    g = torch.Generator().manual_seed(0)
    named: Named = []
    grads: list[Tensor] = []
    for i in range(N_LAYERS):
        for suffix, shape in (("weight", (side, side)), ("bias", (side,))):
            named.append((f"blocks.{i}.{suffix}", (torch.randn(shape, generator=g) / math.sqrt(side)).requires_grad_()))
            grads.append(torch.randn(shape, generator=g) * 1e-2)
    return named, grads


def _ours(name: str, impl: str) -> Factory:
    def make(named: Named, lr: float, wd: float) -> Any:
        opt = build_optimizer(named, name, lr=lr, weight_decay=wd, **({} if impl == "auto" else {"impl": impl}))
        return _train_mode(opt) if get_optimizer_info(name).schedule_free else opt

    return make


def _restore(named: Named, grads: list[Tensor], bufs: list[Tensor]) -> None:
    for (_, p), g, b in zip(named, grads, bufs):
        b.copy_(g)
        p.grad = b  # re-set: a step may have replaced or dropped it


def _step(run: Run, named: Named, grads: list[Tensor], bufs: list[Tensor]) -> float:
    _restore(named, grads, bufs)
    start = time.perf_counter()
    run.opt.step()
    return time.perf_counter() - start


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:110] if str(err) else ''}"


def _ortho_error(make: Factory, side: int, lr: float) -> float:
    """``max |sigma - 1|`` of the update ``make``'s optimizer applies to one square matrix (no decay)."""
    from lightning_opt.optim.muon import orthogonality_error

    g = torch.Generator().manual_seed(1)
    p = (torch.randn(side, side, generator=g) / math.sqrt(side)).requires_grad_()
    p.grad = torch.randn(side, side, generator=g) * 1e-2
    before = p.detach().clone()
    make([("blocks.0.weight", p)], lr, 0.0).step()
    # a square matrix: both Muons' "original" lr adjustment is 1, so the update is lr * O
    return orthogonality_error((before - p.detach()) / lr)


def _run_suite(name: str, peers: list[tuple[str, Factory, float | None]], side: int, rounds: int) -> list[Run]:
    algo = ALGOS[name]
    info = get_optimizer_info(name)
    lr = info.default_lr
    impls = tuple(i for i in OUR_IMPL_ORDER if i == "auto" or i in getattr(info.cls, "impls", ()))
    runs = [Run(f"ours impl={i}", "ours", _ours(name, i), algo.bytes) for i in impls]
    runs += [Run(label, "peer", make, b if b is not None else algo.bytes) for label, make, b in peers]
    if not any(r.label == YARDSTICK for r in runs):
        runs.append(Run(YARDSTICK, "yardstick", lambda n, lr_, wd: torch.optim.AdamW(_plain(n), lr=1e-3, weight_decay=wd, fused=True), YARDSTICK_BYTES))
    named, grads = _param_set(side)
    bufs = [torch.empty_like(g) for g in grads]
    for run in runs:
        try:
            run.opt = run.make(named, lr, WD)
            run.first_ms = _step(run, named, grads, bufs) * 1e3
            _step(run, named, grads, bufs)  # warm-up
        except Exception as err:  # report every run, failed ones too
            run.error, run.opt = _short(err), None
            if run.kind == "ours":
                traceback.print_exc()
    live = [r for r in runs if r.opt is not None]
    for k in range(rounds):
        for run in live if k % 2 == 0 else reversed(live):
            if run.error is None:
                try:
                    run.times.append(_step(run, named, grads, bufs))
                except Exception as err:
                    run.error = _short(err)
    if name == "muon":
        # ours and torch's apply lr * O to a square matrix; other peers scale the update their own way
        for run in runs:
            if run.error is None and (run.kind == "ours" or run.label.startswith("torch Muon")):
                try:
                    run.ortho = _ortho_error(run.make, side, lr)
                except Exception as err:
                    run.ortho = float("nan")
                    print(f"{run.label}: orthogonality not measured: {_short(err)}")
    for run in runs:
        run.opt = None
    del named, grads, bufs
    gc.collect()
    return runs


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def machine_line(threads: int) -> str:
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    have = ", ".join(f"{f}={'yes' if f in flags else 'no'}" for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))
    return (
        f"machine: {model}; {have}; torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}); "
        f"{threads} threads; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    )


def _print_suite(name: str, runs: list[Run], side: int) -> None:
    algo = ALGOS[name]
    yard = next((r for r in runs if r.label == YARDSTICK), None)
    yard_per_byte = yard.ms / YARDSTICK_BYTES if yard is not None and yard.ms else None
    peer_ms = [r.ms for r in runs if r.kind == "peer" and r.ms is not None and (name != "adamw" or "8bit" not in r.label)]
    best_peer = min(peer_ms) if peer_ms else None
    for run in runs:
        ms = run.ms
        if run.error is not None and ms is None:
            print(f"| {name} | {run.label} | unavailable: {run.error} | | | | | |")
            continue
        vs_peer = ms / best_peer if ms is not None and best_peer else None
        per_byte = (ms / run.bytes) / yard_per_byte if ms is not None and run.bytes and yard_per_byte else None
        if name == "muon" and run.kind != "yardstick":
            gflop = N_LAYERS * _ns_flops(side) / 1e9
            extra = f"NS {gflop:.1f} GFLOP/step; orthogonality error {_fmt(run.ortho, '.3f')}"
        elif name == "adamw" and run.kind == "ours":
            extra = "our adamw is torch.optim.AdamW; impl picks torch's path"
        else:
            extra = ""
        if run.error is not None:
            extra = f"{extra}; failed later: {run.error}".lstrip("; ")
        print(
            f"| {name} | {run.label} | {_fmt(ms)} | {_fmt(run.first_ms, '.1f')} | {_fmt(run.bytes, '.0f')} | "
            f"{_fmt(vs_peer)} | {_fmt(per_byte)} | {extra} |"
        )
    print(f"| | *{name} bytes* | | | | | | {algo.note} |")


def _ns_flops(side: int) -> int:
    from lightning_opt.optim.muon import newton_schulz_flops

    return newton_schulz_flops(side, side, 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help=f"comma-separated algorithms (default all: {','.join(ALGOS)})")
    parser.add_argument("--rounds", type=int, default=7, help="timed interleaved rounds (default 7)")
    parser.add_argument("--threads", type=int, default=2, help="torch (and fused kernel) threads (default 2)")
    parser.add_argument("--scale", type=float, default=1.0, help="parameter-count scale (default 1: 25.19M)")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(ALGOS)
    unknown = [n for n in names if n not in ALGOS]
    if unknown:
        parser.error(f"unknown algorithm(s) {unknown}; choose from {', '.join(ALGOS)}")
    if args.rounds < 1 or args.threads < 1 or not args.scale > 0:
        parser.error("--rounds and --threads must be >= 1 and --scale > 0")
    torch.set_num_threads(args.threads)
    side = max(8, round(1024 * math.sqrt(args.scale)))
    n_params = N_LAYERS * (side * side + side)
    peers = _peer_factories()

    results = {}
    for name in names:
        print(f"suite {name}: {len(peers[name])} peers ...", file=sys.stderr, flush=True)
        results[name] = _run_suite(name, peers[name], side, args.rounds)

    print(f"\n{machine_line(args.threads)}")
    print(
        f"{n_params / 1e6:.2f}M fp32 parameters ({N_LAYERS} x {side}^2 + {N_LAYERS} x {side}), CPU; weight_decay={WD}, "
        f"each algorithm's default lr; median of {args.rounds} interleaved rounds per suite\n"
    )
    print("| algorithm | implementation | ms/step | first step ms | B/param | vs best peer | per byte vs torch fused AdamW | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        _print_suite(name, runs, side)
    print(
        "\n'vs best peer': ms over the fastest peer of the same algorithm in the same suite (for adamw, "
        "8-bit peers excluded); 'per byte': (ms / B) over torch fused AdamW's (ms / 28 B) in the same suite; "
        "first step: state allocation plus compile/JIT/kernel build (our C kernels are cached in "
        "~/.cache/lightning_opt after the first build on a machine)."
    )


if __name__ == "__main__":
    main()
