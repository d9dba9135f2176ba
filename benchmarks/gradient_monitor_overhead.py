"""Training-step cost of GradientMonitor (and SpikeGuard) on the demo TinyGPT, interleaved runs.

Run: ``python benchmarks/gradient_monitor_overhead.py [--steps 100] [--rounds 3] [--variants ...]``

Each round fits the same TinyGPT for ``--steps`` optimizer steps once per variant, in turn (the order
alternates between rounds), so slow phases of a shared machine hit every variant alike. A run's cost
is its mean training-step time (``on_train_batch_start`` to ``on_train_batch_end``, summed over the
steps and divided by their number, so the rare logging steps are paid for in full), on two clocks:

- ``cpu``: CPU time of the training thread (``time.thread_time``) with torch pinned to one thread
  (``--threads 1``), which other processes on a shared machine barely disturb;
- ``wall``: ``time.perf_counter``, what a user sees, noisy on a loaded machine.

It also measures the time spent inside the callbacks' own code (hooks and SpikeGuard's step
guard) on the same CPU clock: the overhead attributed directly, free of run-to-run noise. The tables
show medians over rounds and ratios to the run without callbacks. Target: GradientMonitor with
``log_every_n_steps=50`` costs at most 2% more.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_opt.callbacks import GradientMonitor, SpikeGuard
from lightning_opt.demo import CharDataModule, TinyGPT
from lightning_opt.mixin import OptimizerConfig


class StepTimer(Callback):
    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._t0 = self._c0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0, self._c0 = time.perf_counter(), time.thread_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.cpu.append(time.thread_time() - self._c0)
        self.wall.append(time.perf_counter() - self._t0)


class HookClock:
    """CPU time spent inside a callback's own methods (hooks, and SpikeGuard's step decision)."""

    NAMES = (
        "on_before_backward",
        "on_before_optimizer_step",
        "on_train_batch_start",
        "on_train_batch_end",
        "_decide_and_act",
    )

    def __init__(self) -> None:
        self.total = 0.0

    def wrap(self, cb: Callback) -> Callback:
        for name in self.NAMES:
            fn = getattr(cb, name, None)
            if fn is None:
                continue

            def timed(*a, _fn=fn, **k):
                c0 = time.thread_time()
                try:
                    return _fn(*a, **k)
                finally:
                    self.total += time.thread_time() - c0

            setattr(cb, name, timed)
        return cb


VARIANTS = {
    "no callback": list,
    "GradientMonitor(log_every_n_steps=50)": lambda: [GradientMonitor(log_every_n_steps=50)],
    "SpikeGuard(metric='loss')": lambda: [SpikeGuard(metric="loss")],
    "SpikeGuard(metric='both')": lambda: [SpikeGuard(metric="both")],
}


def run(variant: str, data: CharDataModule, steps: int, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    model = TinyGPT(
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=args.n_head,
        block_size=args.block_size,
        optimizer=OptimizerConfig("adamw", lr=1e-3, weight_decay=0.1),
    )
    timer, clock = StepTimer(), HookClock()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[*(clock.wrap(cb) for cb in VARIANTS[variant]()), timer],
    )
    trainer.fit(model, data)
    n = len(timer.cpu) - args.skip_first
    return {
        "cpu": sum(timer.cpu[args.skip_first :]) / n,
        "wall": sum(timer.wall[args.skip_first :]) / n,
        "hooks": clock.total / len(timer.cpu),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: the CPU clock sees all work)"
    )
    parser.add_argument("--skip-first", type=int, default=5, help="warm-up steps left out of each run")
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--n-head", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--variants",
        nargs="*",
        default=list(VARIANTS)[:2],
        choices=list(VARIANTS),
        help="the first is the baseline (default: no callback vs GradientMonitor)",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        import logging

        logging.getLogger(name).setLevel(logging.ERROR)

    torch.set_num_threads(args.threads)
    data = CharDataModule(
        block_size=args.block_size,
        batch_size=args.batch_size,
        max_chars=500_000,
        train_samples=args.batch_size * args.steps,
    )
    data.setup("fit")
    results: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
    for r in range(args.rounds):
        order = args.variants if r % 2 == 0 else list(reversed(args.variants))
        for v in order:
            results[v].append(run(v, data, args.steps, args))

    first = args.variants[0]
    print(
        f"TinyGPT(n_layer={args.n_layer}, n_embd={args.n_embd}), batch {args.batch_size}x{args.block_size}, "
        f"{args.steps} steps x {args.rounds} interleaved rounds; torch {torch.__version__}, "
        f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), {time.strftime('%Y-%m-%d', time.gmtime())}"
    )
    print(
        "| variant | cpu ms/step (median) | ratio | paired cpu ratio | hooks ms/step | hooks / step | wall ms/step (median) | wall ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    base = {k: statistics.median(x[k] for x in results[first]) for k in ("cpu", "wall")}
    for v in args.variants:
        xs = results[v]
        cpu = statistics.median(x["cpu"] for x in xs)
        wall = statistics.median(x["wall"] for x in xs)
        hooks = statistics.median(x["hooks"] for x in xs)
        paired = statistics.median(a["cpu"] / b["cpu"] for a, b in zip(xs, results[first]))
        print(
            f"| {v} | {1e3 * cpu:.2f} | {cpu / base['cpu']:.4f} | {paired:.4f} | {1e3 * hooks:.3f} | "
            f"{100 * hooks / cpu:.2f}% | {1e3 * wall:.2f} | {wall / base['wall']:.4f} |"
        )


if __name__ == "__main__":
    main()
