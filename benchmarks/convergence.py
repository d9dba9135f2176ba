"""Convergence benchmark: the demo's tiny GPT trained with every registered optimizer.

    python benchmarks/convergence.py [--steps 300] [--eval-every 50] [--only adamw,lion]

Each optimizer runs at its registry default lr (``lightning-opt list``), weight decay 0.1 where it
takes one, with the callbacks its registry entry asks for (the mixin adds them), on the same data
order. Prints a markdown table: final validation loss, the first evaluated step at which the
validation loss reached AdamW's final loss, wall time, and optimizer-state bytes per parameter.
Not a test: nothing is asserted. Results go in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_opt import OptimizerConfig, available_optimizers, get_optimizer_info
from lightning_opt.demo import CharDataModule, TinyGPT
from lightning_opt.optim.registry import accepted_hparams


class _Curve(Callback):
    def __init__(self) -> None:
        self.points: list[tuple[int, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.points.append((trainer.global_step, float(trainer.callback_metrics["val_loss"])))


def _state_bytes_per_param(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> float:
    total = 0
    seen: set[int] = set()

    def add(value: object) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor) and id(value) not in seen and value.numel() > 1:
            seen.add(id(value))
            total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            for v in value.values():
                add(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                add(v)

    inner = getattr(optimizer, "optimizer", optimizer)
    add(dict(inner.state))
    return total / sum(p.numel() for p in model.parameters())


def run(name: str, steps: int, eval_every: int, seed: int = 0) -> dict:
    info = get_optimizer_info(name)
    wd = 0.1 if "weight_decay" in accepted_hparams(info) else 0.0
    L.seed_everything(seed, verbose=False)
    model = TinyGPT(n_layer=2, n_embd=64, optimizer=OptimizerConfig(name=name, weight_decay=wd))
    data = CharDataModule(batch_size=32, train_samples=steps * 32, val_samples=128, seed=seed)
    curve = _Curve()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        val_check_interval=eval_every,
        limit_val_batches=4,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0 if name != "adalomo" else None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[curve],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    wall = time.perf_counter() - start
    return {
        "name": name,
        "lr": model.optimizer_config().resolved_lr(),
        "curve": curve.points,
        "final": curve.points[-1][1] if curve.points else float("nan"),
        "wall": wall,
        "bytes": _state_bytes_per_param(trainer.optimizers[0], model),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--only", default="", help="comma-separated names (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    names = [n for n in args.only.split(",") if n] or available_optimizers()
    results = []
    for name in ["adamw", *[n for n in names if n != "adamw"]]:
        try:
            results.append(run(name, args.steps, args.eval_every))
        except Exception as err:  # a benchmark reports every optimizer, failed ones too
            results.append({"name": name, "error": f"{type(err).__name__}: {err}"[:120]})
        r = results[-1]
        print(f"  {name}: {r.get('final', r.get('error'))}", flush=True)
    target = results[0]["final"]
    print(f"\n{args.steps} steps, batch 32x64 bytes, TinyGPT(n_layer=2, n_embd=64); {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {date.today()}\n")
    print("| optimizer | lr | final val loss | steps to AdamW's final | wall s | state bytes/param |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['name']} | | error: {r['error']} | | | |")
            continue
        reached = next((s for s, v in r["curve"] if v <= target), None)
        print(f"| {r['name']} | {r['lr']:g} | {r['final']:.4f} | {reached if reached is not None else '-'} | {r['wall']:.1f} | {r['bytes']:.1f} |")


if __name__ == "__main__":
    main()
