"""Training-step cost of GradientMonitor (and SpikeGuard) on the demo TinyGPT, interleaved runs.

Run: ``python benchmarks/gradient_monitor_overhead.py [--steps 100] [--rounds 4] [--variants ...]``

Each round fits the same TinyGPT for ``--steps`` optimizer steps once per variant, in turn, so slow
phases of a shared machine hit every variant alike. A run's cost is its mean training-step time
(wall time from ``on_train_batch_start`` to ``on_train_batch_end``, summed over the steps and divided
by their number, so the rare logging steps are paid for in full). The table shows the median over
rounds and the ratio to the run without callbacks. Target: GradientMonitor(log_every_n_steps=50)
costs at most 2% more.
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
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._t0)


VARIANTS = {
    "no callback": lambda: [],
    "GradientMonitor(log_every_n_steps=50)": lambda: [GradientMonitor(log_every_n_steps=50)],
    "SpikeGuard(metric='loss')": lambda: [SpikeGuard(metric="loss")],
    "SpikeGuard(metric='both')": lambda: [SpikeGuard(metric="both")],
}


def run(variant: str, data: CharDataModule, steps: int, args: argparse.Namespace) -> float:
    torch.manual_seed(0)
    model = TinyGPT(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, block_size=args.block_size,
                    optimizer=OptimizerConfig("adamw", lr=1e-3, weight_decay=0.1))
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[*VARIANTS[variant](), timer],
    )
    trainer.fit(model, data)
    times = timer.times[args.skip_first:]
    return sum(times) / len(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--skip-first", type=int, default=5, help="warm-up steps left out of each run")
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--n-head", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS)[:2], choices=list(VARIANTS),
                        help="the first is the baseline (default: no callback vs GradientMonitor)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        import logging

        logging.getLogger(name).setLevel(logging.ERROR)

    data = CharDataModule(block_size=args.block_size, batch_size=args.batch_size, max_chars=500_000,
                          train_samples=args.batch_size * args.steps)
    data.setup("fit")
    results: dict[str, list[float]] = {v: [] for v in args.variants}
    for r in range(args.rounds):
        order = args.variants if r % 2 == 0 else list(reversed(args.variants))
        for v in order:
            results[v].append(run(v, data, args.steps, args))

    base = statistics.median(results[args.variants[0]])
    print(f"TinyGPT(n_layer={args.n_layer}, n_embd={args.n_embd}), batch {args.batch_size}x{args.block_size}, "
          f"{args.steps} steps x {args.rounds} interleaved rounds; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print("| variant | median ms/step | min | max | ratio to first |")
    print("|---|---|---|---|---|")
    for v in args.variants:
        xs = results[v]
        print(f"| {v} | {1e3 * statistics.median(xs):.3f} | {1e3 * min(xs):.3f} | {1e3 * max(xs):.3f} | "
              f"{statistics.median(xs) / base:.4f} |")
    # paired ratios (same round), less sensitive to drift between rounds
    for v in args.variants[1:]:
        paired = [a / b for a, b in zip(results[v], results[args.variants[0]])]
        print(f"paired ratio {v}: median {statistics.median(paired):.4f} (rounds: {', '.join(f'{p:.3f}' for p in paired)})")


if __name__ == "__main__":
    main()
