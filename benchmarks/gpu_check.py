"""The GPU checks of the optimizer engine, as one script (about 3 minutes on an H100/H200).

    python benchmarks/gpu_check.py [--out DIR] [--skip-tests]

1. Runs the GPU- and Triton-marked tests on the real device (``pytest -m "gpu or triton"``).
2. Every registered name with a ``triton`` impl, on GPT-2-124M shapes (fp32 parameters, about 150
   tensors): the median step time (CUDA events), the bytes it moves per parameter, the memory floor
   (bytes / measured copy bandwidth) and the ratio to it (target <= 1.25), and the host time per
   step (target <= 100 us), next to the ``foreach`` impl and torch's fused AdamW.
3. Newton-Schulz at 4096 x 4096 in bf16 against the measured bf16 matmul rate (target >= 50%).

Prints markdown tables and writes ``gpu_check.json`` under ``--out`` (default ``$OUT`` or ``.``).
Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import date

import torch

from lightning_opt import available_optimizers, build_optimizer, get_optimizer_info

#: bytes moved per parameter of one fp32 step: reads + writes of parameter, gradient and state
#: (the extra passes of per-tensor reductions counted: StableAdamW and LAMB read g and v, resp.
#: p, g, m, v, once more for their norms)
BYTES_PER_PARAM = {
    "adamw": 28,
    "lion": 20,
    "stable_adamw": 36,
    "schedule_free_adamw": 28,
    "lamb": 44,
    "lars": 24,
    "sophia": 24,
    "sophia_h": 24,
    "grokadamw": 36,
}


def gpt2_shapes() -> list[tuple[int, ...]]:
    """The parameter shapes of GPT-2 124M (tied head): 148 tensors, 124.4M values."""
    d, layers, vocab, ctx = 768, 12, 50257, 1024
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [*shapes, (d,), (d,)]


class _Model(torch.nn.Module):
    def __init__(self, shapes: list[tuple[int, ...]]) -> None:
        super().__init__()
        self.blocks = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(times)


def time_step(opt: torch.optim.Optimizer, rounds: int = 20) -> tuple[float, float]:
    """(median device ms per step, median host us per step call)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    dev, host = [], []
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    for _ in range(rounds):
        start.record()
        t0 = time.perf_counter()
        opt.step()
        host.append((time.perf_counter() - t0) * 1e6)
        end.record()
        torch.cuda.synchronize()
        dev.append(start.elapsed_time(end))
    return statistics.median(dev), statistics.median(host)


def elementwise_table(bandwidth: float) -> list[dict]:
    rows = []
    shapes = gpt2_shapes()
    n_params = sum(torch.Size(s).numel() for s in shapes)
    for name in available_optimizers():
        impls = getattr(get_optimizer_info(name).cls, "impls", ())
        if "triton" not in impls or name not in BYTES_PER_PARAM:
            continue
        floor_ms = BYTES_PER_PARAM[name] * n_params / bandwidth * 1e3
        for impl in ("triton", "foreach"):
            torch.manual_seed(0)
            model = _Model(shapes).cuda()
            for p in model.parameters():
                p.grad = torch.randn_like(p) * 1e-3
            opt = build_optimizer(model, name, lr=1e-4, weight_decay=0.1 if name != "lars" else 0.0, impl=impl)
            t0 = time.perf_counter()
            opt.step()
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            ms, host_us = time_step(opt)
            rows.append(
                {
                    "name": name,
                    "impl": impl,
                    "ms": ms,
                    "floor_ms": floor_ms,
                    "ratio_to_floor": ms / floor_ms,
                    "host_us": host_us,
                    "first_step_s": first,
                }
            )
            del opt, model
            torch.cuda.empty_cache()
    model = _Model(shapes).cuda()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ms, host_us = time_step(opt)
    floor_ms = BYTES_PER_PARAM["adamw"] * n_params / bandwidth * 1e3
    rows.append({"name": "torch AdamW", "impl": "fused", "ms": ms, "floor_ms": floor_ms, "ratio_to_floor": ms / floor_ms, "host_us": host_us, "first_step_s": float("nan")})
    return rows


def newton_schulz_check(n: int = 4096) -> dict:
    from lightning_opt.optim.muon import zeropower_via_newtonschulz

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        a @ a
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    mm_rate = 2 * n**3 / statistics.median(times)
    g = torch.randn(n, n, device="cuda")
    for _ in range(2):
        zeropower_via_newtonschulz(g, 5, torch.bfloat16)
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start.record()
        out = zeropower_via_newtonschulz(g, 5, torch.bfloat16)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    flops = 5 * (4 * n**3 + 2 * n**3)  # per step: X X^T, A A (b A + c A^2), B X
    sv = torch.linalg.svdvals(out.float())
    return {
        "n": n,
        "matmul_tflops": mm_rate / 1e12,
        "ns_tflops": flops / statistics.median(times) / 1e12,
        "fraction_of_matmul": flops / statistics.median(times) / mm_rate,
        "ns_ms": statistics.median(times) * 1e3,
        "max_abs_sv_minus_1": float((sv - 1).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU")
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": str(date.today())}
    if not args.skip_tests:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_INTERPRET"] = "0"
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu or triton", "tests"],
            capture_output=True,
            text=True,
            env=env,
        )
        result["tests"] = proc.stdout.strip().splitlines()[-1:] if proc.stdout else proc.stderr[-2000:]
        print("tests:", result["tests"])
    bw = copy_bandwidth()
    result["copy_bandwidth_GBps"] = bw / 1e9
    print(f"\n{result['device']}, torch {torch.__version__}, {date.today()}; copy bandwidth {bw / 1e9:.0f} GB/s\n")
    rows = elementwise_table(bw)
    result["elementwise"] = rows
    print("| optimizer | impl | ms/step | floor ms | ratio to floor | host us/step | first step s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['impl']} | {r['ms']:.3f} | {r['floor_ms']:.3f} | {r['ratio_to_floor']:.2f} | {r['host_us']:.0f} | {r['first_step_s']:.2f} |")
    ns = newton_schulz_check()
    result["newton_schulz"] = ns
    print(
        f"\nNewton-Schulz {ns['n']}^2 bf16: {ns['ns_ms']:.2f} ms, {ns['ns_tflops']:.0f} TFLOP/s = "
        f"{100 * ns['fraction_of_matmul']:.0f}% of the bf16 matmul rate ({ns['matmul_tflops']:.0f} TFLOP/s); "
        f"max |sv - 1| = {ns['max_abs_sv_minus_1']:.3f}"
    )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
