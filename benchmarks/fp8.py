"""FP8 benchmark: FP8Precision against a high-precision run on the demo GPT (CPU) or a 4096-wide GPT (GPU).

    python benchmarks/fp8.py --mode cpu [--steps 300] [--width 128]
    python benchmarks/fp8.py --mode gpu [--steps 200] [--width 4096] [--layers 2]

``cpu``: the demo's TinyGPT on the stdlib byte corpus with ``FP8Precision(backend="torch")`` for every
torch recipe (their FP8 GEMMs dequantized to fp32 on the CPU, so the numerics are FP8's, the speed is
not) against ``32-true`` (``--baseline bf16-mixed`` adds bf16-mixed and runs the non-FP8 layers in it:
about 100x slower than fp32 on CPUs without avx512_bf16): final validation loss, its gap to the
baseline, and the fraction of the Linear FLOPs that ran in FP8. ``--width 128`` makes every Linear but the head
eligible for the 128-multiple ``block`` recipe, which the default width 64 (the demo's) is not.

``gpu``: a GPT with ``--width``-wide layers (seq 1024, batch 8), ``bf16-mixed`` against every backend
and recipe that imports and that the GPU supports (torch: tensorwise, delayed, rowwise; torchao:
tensorwise, rowwise, rowwise_with_gw_hp; transformer_engine: delayed, current, block, mxfp8): median
step time, tokens/s, peak memory, loss after ``--steps`` steps. Eager mode (no torch.compile: its
compile time would not fit the 5-minute budget; torchao is much faster compiled). Unavailable
configurations are listed with the reason. Prints markdown tables; nothing is asserted.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from datetime import date

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_opt import OptimizerConfig
from lightning_opt.demo import CharDataModule, TinyGPT
from lightning_opt.plugins import FP8Precision

CPU_CONFIGS = [("32-true", None, None), ("bf16-mixed", None, None)] + [
    ("fp8", "torch", r) for r in ("tensorwise", "delayed", "rowwise", "block", "mxfp8")
]
GPU_CONFIGS = [("bf16-mixed", None, None)] + [
    ("fp8", b, r)
    for b, rs in (
        ("torch", ("tensorwise", "delayed", "rowwise")),
        ("torchao", ("tensorwise", "rowwise", "rowwise_with_gw_hp")),
        ("transformer_engine", ("delayed", "current", "block", "mxfp8")),
    )
    for r in rs
]


class _Timer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.last_loss = float("nan")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)
        self.last_loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)


def _run(kind: str, backend: str | None, recipe: str | None, *, gpu: bool, args: argparse.Namespace) -> dict:
    L.seed_everything(0, verbose=False)
    plugins, precision = [], kind
    plugin = None
    if kind == "fp8":
        # the layers not in FP8 run in the baseline's precision
        plugin = FP8Precision(backend=backend, recipe=recipe, fallback="error", precision=args.baseline)  # type: ignore[arg-type]
        plugins, precision = [plugin], None
    opt = OptimizerConfig(name="adamw", lr=args.lr, weight_decay=0.1, hparams={"betas": [0.9, 0.95]})
    model = TinyGPT(block_size=args.seq, n_layer=args.layers, n_head=args.heads, n_embd=args.width, optimizer=opt)
    data = CharDataModule(block_size=args.seq, batch_size=args.batch, train_samples=args.steps * args.batch,
                          val_samples=args.val_samples, seed=0)
    timer = _Timer()
    trainer = L.Trainer(
        accelerator="cuda" if gpu else "cpu",
        devices=1,
        precision=precision,
        plugins=plugins,
        max_steps=args.steps,
        limit_val_batches=args.val_batches if not gpu else 0,
        num_sanity_val_steps=0,
        val_check_interval=None,
        check_val_every_n_epoch=1,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    wall = time.perf_counter() - start
    out = {
        "name": kind if plugin is None else f"fp8 {backend} {recipe}",
        "wall": wall,
        "step_ms": 1e3 * statistics.median(timer.times[len(timer.times) // 4 :]),
        "train_loss": timer.last_loss,
        "flops": plugin.fp8_flop_fraction if plugin is not None else 0.0,
        "layers": f"{sum(r.converted for r in plugin.converted)}/{len(plugin.converted)}" if plugin else "-",
    }
    if gpu:
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["tok_s"] = args.batch * args.seq / (out["step_ms"] / 1e3)
    else:
        out["val_loss"] = float(trainer.validate(model, datamodule=data, verbose=False)[0]["val_loss"])
    return out


def _available(backend: str, recipe: str) -> str | None:
    """Why this configuration cannot run here (None when it can)."""
    from lightning_opt.plugins import _fp8_backends as backends

    try:
        if backend == "torchao":
            backends.import_torchao()
        elif backend == "transformer_engine":
            backends.import_te()
    except ModuleNotFoundError as err:
        return str(err).split(":")[0] + " (not installed)"
    dev = torch.device("cuda")
    return backends.requirement(backend, recipe, dev, torch.cuda.get_device_capability(), torch.version.cuda)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default: torch's; 1 is faster for these tiny CPU GEMMs on a busy machine)")
    parser.add_argument("--only", default="", help="comma-separated config names, e.g. 'bf16-mixed,fp8 torch delayed'")
    parser.add_argument("--baseline", choices=("bf16-mixed", "32-true"), default=None,
                        help="the reference run, also the precision of the layers not in FP8 (default: bf16-mixed on "
                        "the GPU; 32-true on the CPU, where bf16-mixed runs only when this says so: it is ~100x "
                        "slower than fp32 on CPUs without avx512_bf16)")
    args = parser.parse_args()
    gpu = args.mode == "gpu"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--mode gpu needs a CUDA GPU")
    args.steps = args.steps or (200 if gpu else 300)
    args.baseline = args.baseline or ("bf16-mixed" if gpu else "32-true")
    args.width = args.width or (4096 if gpu else 64)
    args.heads = max(1, args.width // 128) if gpu else 2
    args.seq, args.batch = (1024, 8) if gpu else (64, 32)
    args.lr = 3e-4 if gpu else 1e-3
    args.val_samples, args.val_batches = 256, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("high")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    results, missing = [], []
    for kind, backend, recipe in GPU_CONFIGS if gpu else CPU_CONFIGS:
        name = kind if backend is None else f"fp8 {backend} {recipe}"
        if args.only and name not in args.only.split(","):
            continue
        if not gpu and name == "bf16-mixed" and args.baseline != "bf16-mixed":
            continue
        why = _available(backend, recipe) if gpu and backend is not None else None
        if recipe == "block" and args.width % 128:
            why = f"needs Linear dims that are multiples of 128 (--width {args.width}; run it with --width 128)"
        if why is not None:
            missing.append((name, why))
            continue
        try:
            results.append(_run(kind, backend, recipe, gpu=gpu, args=args))
        except Exception as err:  # report every configuration, failed ones too
            missing.append((name, f"{type(err).__name__}: {err}"[:200]))
            continue
        if gpu:
            torch.cuda.empty_cache()
        print(f"  {results[-1]}", flush=True)
    where = torch.cuda.get_device_name() if gpu else (platform.processor() or platform.machine())
    print(f"\n{args.steps} steps, batch {args.batch}x{args.seq} tokens, TinyGPT(n_layer={args.layers}, "
          f"n_embd={args.width}); {where}, {torch.get_num_threads()} threads, torch {torch.__version__}, {date.today()}\n")
    base = next((r for r in results if r["name"] == args.baseline), None)
    if gpu:
        print(f"| config | step ms | tokens/s | speed vs {args.baseline} | peak GiB | train loss at end | FP8 Linear FLOPs |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            speed = base["step_ms"] / r["step_ms"] if base else float("nan")
            print(f"| {r['name']} | {r['step_ms']:.1f} | {r['tok_s']:,.0f} | {speed:.2f}x | {r['peak_gib']:.1f} | "
                  f"{r['train_loss']:.4f} | {r['flops']:.0%} |")
    else:
        print(f"| config | final val loss | vs {args.baseline} | FP8 Linear FLOPs | layers in FP8 | ms/step | wall s |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            gap = 100 * (r["val_loss"] / base["val_loss"] - 1) if base else float("nan")
            print(f"| {r['name']} | {r['val_loss']:.4f} | {gap:+.2f}% | {r['flops']:.0%} | {r['layers']} | "
                  f"{r['step_ms']:.0f} | {r['wall']:.0f} |")
    for name, why in missing:
        print(f"| {name} | not run: {why} |")


if __name__ == "__main__":
    main()
