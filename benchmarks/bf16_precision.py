"""BF16Precision: measured bytes per parameter of each mode, and the demo GPT's validation loss.

    python benchmarks/bf16_precision.py bytes                 # the memory table (seconds)
    python benchmarks/bf16_precision.py gpt --steps 2000      # fp32 vs bf16 true + kahan on the demo

``bytes``: the demo GPT (default size) converted by the plugin, one optimizer step taken through it,
then every distinct tensor storage held by the model (parameters, buffers) and the optimizer state
(the plugin's masters / buffers live there) is summed and divided by the parameter count; gradients
are freed first (they are the same 2 B/param in every bf16 mode and 4 B/param in fp32/mixed).

``gpt``: the demo's Trainer settings (AdamW at its default lr, clipping 1.0, validation on 8 batches)
for ``--steps`` steps, once in float32 and once per ``--modes`` entry; prints the final validation
loss and its ratio to float32's. The demo's full 2000 steps take long on CPUs without bf16 matmul
units (AVX2 only): bf16 matmuls are slow there.
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_opt.optim.build import build_optimizer
from lightning_opt.plugins import BF16Precision

OPTIMIZERS = ("adamw", "sgd", "lion", "lamb", "muon", "soap")
MODES = ("fp32 (no plugin)", "mixed", "true/fp32", "true/kahan", "true/stochastic", "true/none")


def _storages(obj, seen: dict[int, int]) -> None:
    if torch.is_tensor(obj):
        local = obj.to_local() if hasattr(obj, "to_local") else obj
        st = local.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    elif isinstance(obj, dict):
        for v in obj.values():
            _storages(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _storages(v, seen)


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages of ``model``'s parameters and buffers and ``optimizer``'s state."""
    seen: dict[int, int] = {}
    _storages(list(model.parameters()) + list(model.buffers()), seen)
    _storages([dict(s) for s in optimizer.state.values()], seen)
    return sum(seen.values())


def bytes_table() -> None:
    from lightning_opt.demo.gpt import TinyGPT

    x = torch.randint(0, 256, (4, 64))
    print(f"bytes per parameter (model + optimizer state + plugin buffers), TinyGPT {sum(p.numel() for p in TinyGPT().parameters()):,} params")
    print("| optimizer | " + " | ".join(MODES) + " |")
    print("|---" * (len(MODES) + 1) + "|")
    for name in OPTIMIZERS:
        row = []
        for mode in MODES:
            torch.manual_seed(0)
            model = TinyGPT()
            plugin = None
            if mode.startswith("true"):
                plugin = BF16Precision(mode="true", master_weights=mode.split("/")[1])
            elif mode == "mixed":
                plugin = BF16Precision(mode="mixed")
            if plugin:
                model = plugin.convert_module(model)
            opt = build_optimizer(model, name, lr=1e-3, weight_decay=0.1)
            if plugin:
                plugin.prepare_optimizer(opt)
            ctx = plugin.forward_context() if plugin else torch.autocast("cpu", enabled=False)
            with ctx:
                model.loss((x, x)).backward()
            plugin.step(opt) if plugin else opt.step()
            opt.zero_grad(set_to_none=True)
            n = sum(p.numel() for p in model.parameters())
            row.append(f"{held_bytes(model, opt) / n:.2f}")
        print(f"| {name} | " + " | ".join(row) + " |")


def gpt(steps: int, modes: list[str]) -> None:
    import lightning as L

    from lightning_opt.demo import CharDataModule, TinyGPT

    torch.set_float32_matmul_precision("high")
    results = {}
    for mode in ["fp32", *modes]:
        L.seed_everything(0, verbose=False)
        plugins = [] if mode == "fp32" else [BF16Precision(mode="true", master_weights=mode)]
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            val_check_interval=min(500, steps),
            limit_val_batches=8,
            gradient_clip_val=1.0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            plugins=plugins,
        )
        model, data = TinyGPT(), CharDataModule()
        t0 = time.perf_counter()
        trainer.fit(model, datamodule=data)
        val = trainer.validate(model, datamodule=data, verbose=False)[0]["val_loss"]
        results[mode] = (val, time.perf_counter() - t0)
        print(f"{mode:12s} val_loss {val:.4f}  ({results[mode][1]:.0f} s)", flush=True)
    base = results["fp32"][0]
    for mode, (val, _) in results.items():
        print(f"| {mode} | {val:.4f} | {100 * (val / base - 1):+.2f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("bytes")
    g = sub.add_parser("gpt")
    g.add_argument("--steps", type=int, default=2000)
    g.add_argument("--modes", nargs="+", default=["kahan"], choices=["fp32", "kahan", "stochastic", "none"])
    args = parser.parse_args()
    if args.what == "bytes":
        bytes_table()
    else:
        gpt(args.steps, args.modes)


if __name__ == "__main__":
    main()
