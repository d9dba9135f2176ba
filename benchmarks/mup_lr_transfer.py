"""μP learning-rate transfer on the demo GPT: the best AdamW lr at a base and a wider width, with and without μP.

Not a test. Trains the demo's TinyGPT on the demo corpus (stdlib bytes) at the base width and at a
wider one over a factor-2 lr grid, every run on the same batches from the same seed, and prints a
markdown table of final validation loss (nats per byte) with the best lr per column. At the base width
μP and standard parametrization (SP) are the same model, so that column is trained once.

"With μP" is the whole parametrization: μP init relative to the base width (Tensor Programs V, Table
3: hidden weights' std times sqrt(base_fan_in / fan_in), the plain ``nn.Linear`` readout's std times
base_fan_in / fan_in) and μP lrs from ``build_optimizer(..., mup_base_model=base)``. The head dim is
fixed (heads grow with width), so attention's 1/sqrt(head_dim) needs no μP change.

    python benchmarks/mup_lr_transfer.py --widths 64 512 --steps 150 --threads 2 --plot docs/mup_lr_transfer.png
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch

from lightning_opt import build_optimizer
from lightning_opt.demo import CharDataModule, TinyGPT

HEAD_DIM = 16


def make_model(width: int, *, base_width: int, mup: bool, n_layer: int, block_size: int, seed: int) -> TinyGPT:
    torch.manual_seed(seed)
    model = TinyGPT(vocab_size=256, block_size=block_size, n_layer=n_layer, n_head=max(1, width // HEAD_DIM), n_embd=width)
    if mup and width != base_width:
        ratio = base_width / width  # base_fan_in / fan_in of every hidden matrix and of the readout
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2 and name.startswith("transformer.h."):
                    p.mul_(math.sqrt(ratio))
            model.lm_head.weight.mul_(ratio)
    return model


def run(width: int, lr: float, *, mup: bool, args: argparse.Namespace, train: list, val: list) -> float:
    model = make_model(width, base_width=args.widths[0], mup=mup, n_layer=args.n_layer, block_size=args.block_size, seed=args.seed)
    base = make_model(args.widths[0], base_width=args.widths[0], mup=False, n_layer=args.n_layer, block_size=args.block_size, seed=args.seed)
    opt = build_optimizer(model, "adamw", lr=lr, weight_decay=0.0, betas=(0.9, 0.95), mup_base_model=base if mup else None)
    initial = [g["lr"] for g in opt.param_groups]
    model.train()
    for step, batch in enumerate(train):
        warm = min(1.0, (step + 1) / args.warmup)
        for g, lr0 in zip(opt.param_groups, initial):
            g["lr"] = lr0 * warm
        loss = model.loss(batch)
        if not torch.isfinite(loss):
            return math.inf
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        value = sum(model.loss(b).item() for b in val) / len(val)
    return value if math.isfinite(value) else math.inf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs=2, default=[64, 512], help="base width and the wider width")
    parser.add_argument("--log2-lr", type=int, nargs=2, default=[-12, -4], help="lr grid 2**lo .. 2**hi, factor 2")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--columns", nargs="+", choices=["base", "sp", "mup"], default=["base", "sp", "mup"], help="which sweeps to run")
    parser.add_argument("--plot", default=None, help="write a PNG of loss vs lr here (needs matplotlib)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = CharDataModule(block_size=args.block_size, batch_size=args.batch_size, max_chars=1_000_000, train_samples=args.steps * args.batch_size, val_samples=args.val_batches * args.batch_size, seed=args.seed)
    data.setup()
    train, val = list(data.train_dataloader()), list(data.val_dataloader())
    lrs = [2.0**k for k in range(args.log2_lr[0], args.log2_lr[1] + 1)]
    base_w, wide = args.widths
    every = {"base": (f"width {base_w} (SP = μP)", base_w, False), "sp": (f"width {wide} SP", wide, False), "mup": (f"width {wide} μP", wide, True)}
    columns = {every[c][0]: every[c][1:] for c in args.columns}
    results: dict[str, list[float]] = {}
    start = time.perf_counter()
    for label, (width, mup) in columns.items():
        results[label] = []
        for lr in lrs:
            t = time.perf_counter()
            results[label].append(run(width, lr, mup=mup, args=args, train=train, val=val))
            print(f"# {label} lr=2^{round(math.log2(lr))}: {results[label][-1]:.4f} ({time.perf_counter() - t:.1f} s)", flush=True)
    total = time.perf_counter() - start

    best = {label: lrs[min(range(len(lrs)), key=losses.__getitem__)] for label, losses in results.items()}
    print(f"\nTinyGPT {args.n_layer} layers, head dim {HEAD_DIM}, AdamW betas (0.9, 0.95), no weight decay, {args.steps} steps of "
          f"{args.batch_size} x {args.block_size} bytes, warmup {args.warmup}, constant lr; {args.val_batches} validation batches; "
          f"{total:.0f} s on {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}\n")
    print("| lr | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for i, lr in enumerate(lrs):
        cells = [(f"**{results[c][i]:.4f}**" if best[c] == lr else f"{results[c][i]:.4f}") for c in columns]
        print(f"| 2^{round(math.log2(lr))} = {lr:.3g} | " + " | ".join(cells) + " |")
    labels = list(columns)
    for label in labels[1:]:
        steps = round(math.log2(best[label] / best[labels[0]]))
        print(f"\nbest lr, {label}: {best[label]:.3g} ({steps:+d} grid steps from width {base_w}'s {best[labels[0]]:.3g})")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for label, losses in results.items():
            ax.plot([math.log2(lr) for lr in lrs], [min(x, 6.0) for x in losses], marker="o", label=label)
        ax.set_xlabel("log2 lr (AdamW)")
        ax.set_ylabel("validation loss, nats/byte (capped at 6)")
        ax.set_title("μP lr transfer, demo TinyGPT")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=80)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
