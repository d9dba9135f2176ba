"""The Triton kernels equal the per-tensor reference functions (run in Triton's interpreter on the CPU).

Each kernel steps one bucket of odd shapes ((1,), (5,), (1025,), (7, 3), (33, 65)) and is compared
with its family's reference function in a loop: fp32 and bf16 parameters, weight decay on and off,
Kahan on (bf16, where the family has it) and stochastic rounding (bf16, where the reference takes
``stochastic``). Launches are counted on every step (one per bucket, three with a per-tensor
reduction). The interpreter runs 27-750x slower than eager, so the steps are cut from 20 to
``STEPS`` (the kernels are bit-exact with the reference in most cases, and differ by float32
rounding of a reduction or of torch's approximate CPU sqrt otherwise). Without a GPU, every kernel
variant is still compiled for sm_90 (Triton's frontend, LLVM, ptxas) in a fresh process; a
GPU-marked test runs the compiled kernels on CUDA against the same references (20 steps).
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# before triton is imported anywhere in this process (tests/conftest.py does the same)
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytestmark = pytest.mark.triton

SHAPES = [(1,), (5,), (1025,), (7, 3), (33, 65)]
STEPS = 6  # not 20: the interpreter's cost (see the module docstring)
BF16 = torch.bfloat16


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


needs_interpreter = pytest.mark.skipif(not _interpreted(), reason="needs TRITON_INTERPRET=1 for CPU tensors")


def _takes_stochastic(fn: Callable) -> bool:
    return "stochastic" in inspect.signature(fn).parameters


@dataclass
class Spec:
    """One kernel: its state, its call, the reference's call, and launches per call."""

    name: str
    state: Callable  # (params, kahan) -> dict of lists
    kernel: Callable  # (params, grads, state, step, wd, stochastic) -> None
    reference: Callable  # (params, grads, state, step, wd, stochastic) -> None (per tensor inside)
    launches: int
    kahan: bool
    stochastic: bool
    # a per-tensor reduction the reference takes in float32 (torch's order, which no kernel can
    # follow): stochastic rounding is then compared within tolerance, not bit for bit
    float32_reduction: bool = False


def _zeros(params, dtype=None):
    return [torch.zeros(p.shape, dtype=dtype or p.dtype) for p in params]


def _fp32_for_low(p):
    return torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype


def _comps(params, kahan):
    return [torch.zeros_like(p) if kahan and p.dtype == BF16 else None for p in params]


# ---- the specs


def _lion() -> Spec:
    from lightning_opt.kernels.triton_lion import lion_triton_
    from lightning_opt.optim.lion import lion_update_

    hp = dict(lr=1e-2, beta1=0.9, beta2=0.99)

    def state(ps, kahan):
        return {"m": _zeros(ps), "c": _comps(ps, kahan)}

    def kernel(ps, gs, s, step, wd, sr):
        lion_triton_(ps, gs, s["m"], s["c"], weight_decay=wd, stochastic=sr, **hp)

    def reference(ps, gs, s, step, wd, sr):
        for p, g, m, c in zip(ps, gs, s["m"], s["c"]):
            lion_update_(p, g, m, weight_decay=wd, kahan_comp=c, stochastic=sr, **hp)

    return Spec("lion", state, kernel, reference, 1, True, True)


def _adamw() -> Spec:
    from lightning_opt.kernels.triton_adamw import adamw_triton_
    from lightning_opt.optim.base import adamw_update_

    hp = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8)

    def state(ps, kahan):
        return {"m": [torch.zeros(p.shape, dtype=_fp32_for_low(p)) for p in ps],
                "v": [torch.zeros(p.shape, dtype=_fp32_for_low(p)) for p in ps]}

    def kernel(ps, gs, s, step, wd, sr):
        adamw_triton_(ps, gs, s["m"], s["v"], [step] * len(ps), weight_decay=wd, **hp)

    def reference(ps, gs, s, step, wd, sr):
        for p, g, m, v in zip(ps, gs, s["m"], s["v"]):
            adamw_update_(p, g, m, v, step, weight_decay=wd, **hp)

    return Spec("adamw", state, kernel, reference, 1, False, False)


def _stable_adamw() -> Spec:
    from lightning_opt.kernels.triton_stable_adamw import stable_adamw_triton_
    from lightning_opt.optim.stable_adamw import stable_adamw_update_

    hp = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-6)
    sr_ok = _takes_stochastic(stable_adamw_update_)

    def state(ps, kahan):
        return {"m": _zeros(ps), "v": _zeros(ps), "c": _comps(ps, kahan), "lr_t": [None] * len(ps)}

    def kernel(ps, gs, s, step, wd, sr):
        # a spike on one step makes the RMS clip (lr_t < lr)
        s["lr_t"] = stable_adamw_triton_(
            ps, gs, s["m"], s["v"], s["c"], [step] * len(ps), weight_decay=wd, stochastic=sr, **hp
        )

    def reference(ps, gs, s, step, wd, sr):
        extra = {"stochastic": sr} if sr_ok else {}
        s["lr_t"] = [
            stable_adamw_update_(p, g, m, v, step=step, weight_decay=wd, kahan_comp=c, **hp, **extra)
            for p, g, m, v, c in zip(ps, gs, s["m"], s["v"], s["c"])
        ]

    return Spec("stable_adamw", state, kernel, reference, 3, True, sr_ok, float32_reduction=True)


def _schedule_free(direction: str) -> Spec:
    from lightning_opt.kernels.triton_schedule_free import schedule_free_triton_
    from lightning_opt.optim import schedule_free as sf

    def hp(step, wd, sr):
        c, _, _ = sf.average_weight(step - 1, 1e-2, 1e-2, 1e-4 * (step - 1), r=0.0, weight_lr_power=2.0)
        return dict(direction=direction, lr=1e-2, beta=0.9, beta2=0.999, eps=1e-8,
                    bias_correction2=1 - 0.999**step, weight_decay=wd, c=c, stochastic=sr)

    def state(ps, kahan):
        return {"z": [p.to(_fp32_for_low(p), copy=True) for p in ps],
                "v": [torch.zeros(p.shape, dtype=_fp32_for_low(p)) for p in ps]}

    def kernel(ps, gs, s, step, wd, sr):
        schedule_free_triton_(ps, gs, s["z"], s["v"], **hp(step, wd, sr))

    def reference(ps, gs, s, step, wd, sr):
        kw = hp(step, wd, sr)
        for p, g, z, v in zip(ps, gs, s["z"], s["v"]):
            if hasattr(sf, "schedule_free_step_"):
                sf.schedule_free_step_(p, g, z, v, **kw)
                continue
            # AdamWScheduleFree.step: adam_direction + schedule_free_update_ (older family file)
            y = p if p.dtype == z.dtype else p.to(z.dtype)
            d = sf.adam_direction(g.to(z.dtype), v, beta2=kw["beta2"], bias_correction2=kw["bias_correction2"],
                                  eps=kw["eps"])
            if wd:
                d.add_(y, alpha=wd)
            sf.schedule_free_update_(y, z, d, lr=kw["lr"], beta=kw["beta"], c=kw["c"])
            if y is not p:
                from lightning_opt.optim.precision import store_

                store_(p, y, stochastic=sr)

    return Spec(f"schedule_free_{direction}", state, kernel, reference, 1, False, True)


def _lamb() -> Spec:
    from lightning_opt.kernels.triton_lamb_lars import lamb_triton_
    from lightning_opt.optim.lamb_lars import lamb_update_

    sr_ok = _takes_stochastic(lamb_update_)
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-6, grad_scale=torch.tensor(0.7), trust_clip=False)

    def state(ps, kahan):
        return {"m": _zeros(ps), "v": _zeros(ps), "c": _comps(ps, kahan)}

    def kernel(ps, gs, s, step, wd, sr):
        lamb_triton_(ps, gs, s["m"], s["v"], s["c"], [step] * len(ps), weight_decay=wd, stochastic=sr, **hp)

    def reference(ps, gs, s, step, wd, sr):
        extra = {"stochastic": sr} if sr_ok else {}
        for p, g, m, v, c in zip(ps, gs, s["m"], s["v"], s["c"]):
            lamb_update_(p, g, m, v, step=step, weight_decay=wd, kahan_comp=c, **hp, **extra)

    return Spec("lamb", state, kernel, reference, 3, True, sr_ok)


def _lars() -> Spec:
    from lightning_opt.kernels.triton_lamb_lars import lars_triton_
    from lightning_opt.optim.lamb_lars import lars_update_

    sr_ok = _takes_stochastic(lars_update_)
    hp = dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True, trust_coeff=1e-3, eps=1e-8)

    def state(ps, kahan):
        return {"buf": [None] * len(ps), "c": _comps(ps, kahan)}

    def kernel(ps, gs, s, step, wd, sr):
        s["buf"] = lars_triton_(ps, gs, s["buf"], s["c"], weight_decay=wd, stochastic=sr, **hp)

    def reference(ps, gs, s, step, wd, sr):
        extra = {"stochastic": sr} if sr_ok else {}
        s["buf"] = [
            lars_update_(p, g, b, weight_decay=wd, kahan_comp=c, **hp, **extra)
            for p, g, b, c in zip(ps, gs, s["buf"], s["c"])
        ]

    return Spec("lars", state, kernel, reference, 3, True, sr_ok)


def _sophia() -> Spec:
    from lightning_opt.kernels.triton_sophia import sophia_triton_
    from lightning_opt.optim.sophia import sophia_update_

    sr_ok = _takes_stochastic(sophia_update_)
    hp = dict(lr=1e-2, beta1=0.9, scale=0.32, eps=1e-12)

    def state(ps, kahan):
        g = torch.Generator().manual_seed(3)
        return {"m": [torch.zeros(p.shape, dtype=_fp32_for_low(p)) for p in ps],
                "h": [torch.rand(p.shape, generator=g, dtype=_fp32_for_low(p)) * 0.01 for p in ps],
                "c": _comps(ps, kahan)}

    def kernel(ps, gs, s, step, wd, sr):
        sophia_triton_(ps, gs, s["m"], s["h"], s["c"], weight_decay=wd, stochastic=sr, **hp)

    def reference(ps, gs, s, step, wd, sr):
        extra = {"stochastic": sr} if sr_ok else {}
        for p, g, m, h, c in zip(ps, gs, s["m"], s["h"], s["c"]):
            sophia_update_(p, g, m, h, weight_decay=wd, kahan_comp=c, **hp, **extra)

    return Spec("sophia", state, kernel, reference, 1, True, sr_ok)


def _grokadamw() -> Spec:
    from lightning_opt.kernels.triton_grokadamw import grokadamw_triton_
    from lightning_opt.optim.grokadamw import grokadamw_update_

    sr_ok = _takes_stochastic(grokadamw_update_)
    hp = dict(lr=1e-2, beta2=0.99, eps=1e-8, alpha=0.98, lamb=2.0, gradient_clipping=1.0)
    betas = [0.9 * (1 - 0.1) ** i for i in range(len(SHAPES))]

    def state(ps, kahan):
        return {"m": _zeros(ps), "v": _zeros(ps), "e": _zeros(ps), "c": _comps(ps, kahan)}

    def kernel(ps, gs, s, step, wd, sr):
        grokadamw_triton_(ps, gs, s["m"], s["v"], s["e"], s["c"], [step] * len(ps), betas, beta1=0.9,
                          weight_decay=wd, stochastic=sr, **hp)

    def reference(ps, gs, s, step, wd, sr):
        extra = {"stochastic": sr} if sr_ok else {}
        for i, (p, g, m, v, e, c) in enumerate(zip(ps, gs, s["m"], s["v"], s["e"], s["c"])):
            grokadamw_update_(p, g, m, v, e, step=step, layer_beta1=betas[i], bias_beta1=0.9, weight_decay=wd,
                              kahan_comp=c, **hp, **extra)

    return Spec("grokadamw", state, kernel, reference, 3, True, sr_ok)


SPECS: dict[str, Callable[[], Spec]] = {
    "lion": _lion,
    "adamw": _adamw,
    "stable_adamw": _stable_adamw,
    "schedule_free_adam": lambda: _schedule_free("adam"),
    "schedule_free_sgd": lambda: _schedule_free("sgd"),
    "lamb": _lamb,
    "lars": _lars,
    "sophia": _sophia,
    "grokadamw": _grokadamw,
}

# (dtype, weight decay, rounding): wd on/off in both dtypes, Kahan and SR on bf16
CONFIGS = [
    (torch.float32, 0.0, "nearest"),
    (torch.float32, 0.1, "nearest"),
    (BF16, 0.0, "nearest"),
    (BF16, 0.1, "nearest"),
    (BF16, 0.1, "kahan"),
    (BF16, 0.1, "stochastic"),
]


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g).to(dtype) for s in SHAPES]
    ps[0].zero_()  # a zero tensor: the trust ratios' "norm is 0" branch
    return ps


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, list):
        return [_clone(v) for v in x]
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


def _tensors(state):
    for key in sorted(state):
        for i, t in enumerate(state[key]):
            if isinstance(t, torch.Tensor):
                yield f"{key}[{i}]", t


def run_case(spec: Spec, dtype, wd, rounding, device="cpu", steps=STEPS):
    """Step kernel and reference side by side; returns (kernel, reference) parameters and states."""
    from lightning_opt.kernels.triton_launcher import launch_count

    kahan, sr = rounding == "kahan", rounding == "stochastic"
    ps = [p.to(device) for p in _params(dtype)]
    state = {k: [None if t is None else t.to(device) for t in v] for k, v in spec.state(ps, kahan).items()}
    rps, rstate = _clone(ps), _clone(state)
    g = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        spike = 30.0 if step == 3 else 1.0
        gs = [(torch.randn(s, generator=g) * spike).to(dtype).to(device) for s in SHAPES]
        before = launch_count()
        spec.kernel(ps, gs, state, step, wd, sr)
        assert launch_count() - before == spec.launches, f"{spec.name}: launches per step"
        spec.reference(rps, gs, rstate, step, wd, sr)
    return ps, state, rps, rstate


def _assert_equal(spec, ps, state, rps, rstate, loose=False):
    # loose: stochastic rounding hashes the float32 bits of each updated value, so where a per-tensor
    # reduction (StableAdamW's float32 mean) differs from torch's in its last bit, every element may
    # round the other way (one bf16 ulp a step); the norms (float64, as lamb_lars.tensor_norm) agree
    tol = {"atol": 3e-2, "rtol": 3e-2} if loose else {}
    for i, (a, b) in enumerate(zip(ps, rps)):
        torch.testing.assert_close(a, b, msg=lambda m: f"{spec.name} param {i}: {m}", **tol)
    got, ref = dict(_tensors(state)), dict(_tensors(rstate))
    assert got.keys() == ref.keys()
    for k in got:
        a, b = got[k].to(ref[k].dtype), ref[k]
        torch.testing.assert_close(a, b, msg=lambda m: f"{spec.name} {k}: {m}", **(tol if loose else {}))


@needs_interpreter
@pytest.mark.parametrize("config", CONFIGS, ids=[f"{d}-wd{w}-{r}".replace("torch.", "") for d, w, r in CONFIGS])
@pytest.mark.parametrize("name", list(SPECS))
def test_kernel_equals_reference(name: str, config) -> None:
    spec = SPECS[name]()
    dtype, wd, rounding = config
    if rounding == "kahan" and not spec.kahan:
        pytest.skip(f"{name} has no kahan_sum")
    if rounding == "stochastic" and not spec.stochastic:
        pytest.skip(f"{name}'s reference takes no stochastic argument")
    ps, state, rps, rstate = run_case(spec, dtype, wd, rounding)
    _assert_equal(spec, ps, state, rps, rstate, loose=rounding == "stochastic" and spec.float32_reduction)


@needs_interpreter
def test_stochastic_rounding_draws_the_reference_bits() -> None:
    # an update far below bf16's resolution: only the stochastic rounding moves the parameter, and
    # it must move exactly the elements precision.stochastic_round moves
    from lightning_opt.kernels.triton_lion import lion_triton_
    from lightning_opt.optim.lion import lion_update_

    p = torch.ones(4097, dtype=BF16)
    g = torch.randn(4097).to(BF16)
    a, b = p.clone(), p.clone()
    ma, mb = torch.zeros_like(p), torch.zeros_like(p)
    lion_triton_([a], [g], [ma], [None], lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0, stochastic=True)
    lion_update_(b, g, mb, lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0, stochastic=True)
    assert torch.equal(a, b)
    assert (a != p).any()  # some elements did round away from 1


@needs_interpreter
def test_one_launch_per_bucket_per_step() -> None:
    from lightning_opt.kernels.triton_launcher import launch_count
    from lightning_opt.optim.lion import Lion

    g = torch.Generator().manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    b = [torch.nn.Parameter(torch.randn(s, generator=g).to(BF16)) for s in SHAPES[:2]]
    c = [torch.nn.Parameter(torch.randn(9, generator=g))]
    opt = Lion([{"params": a + b}, {"params": c}], lr=1e-3, impl="triton")
    for _ in range(2):
        for p in a + b + c:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        before = launch_count()
        opt.step()
        # group 1: an fp32 and a bf16 bucket; group 2: one fp32 bucket
        assert launch_count() - before == 3


@needs_interpreter
def test_reductions_are_deterministic() -> None:
    spec = _stable_adamw()
    first = run_case(spec, torch.float32, 0.1, "nearest", steps=2)
    second = run_case(spec, torch.float32, 0.1, "nearest", steps=2)
    for x, y in zip(first[0], second[0]):
        assert torch.equal(x, y)
    for x, y in zip(first[1]["lr_t"], second[1]["lr_t"]):
        assert torch.equal(x, y)


@needs_interpreter
def test_lr_t_is_a_device_tensor_and_clips() -> None:
    from lightning_opt.kernels.triton_stable_adamw import stable_adamw_triton_

    p, m, v = torch.ones(10), torch.zeros(10), torch.full((10,), 1e-6)
    out = stable_adamw_triton_([p], [torch.full((10,), 100.0)], [m], [v], [None], [2], lr=1e-2, beta1=0.9,
                               beta2=0.99, eps=1e-6, weight_decay=0.0)
    assert isinstance(out[0], torch.Tensor) and out[0].dim() == 0
    assert 0 < out[0].item() < 1e-2


@needs_interpreter
def test_auto_never_picks_the_interpreter() -> None:
    from lightning_opt.kernels import triton_launcher
    from lightning_opt.optim.engine import resolve_impl

    assert triton_launcher.usable("cpu")  # the interpreter is there, impl="triton" may ask for it
    assert resolve_impl("Lion", "auto", ("for_loop", "foreach", "fused", "triton"), torch.zeros(3), "lion") in (
        "fused",
        "for_loop",
    )
    assert resolve_impl("Lion", "triton", ("for_loop", "triton"), torch.zeros(3), "lion") == "triton"


def test_usable_and_require_name_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_opt.kernels import triton_launcher

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_launcher.usable("cpu")
    with pytest.raises(RuntimeError, match="no CPU driver.*TRITON_INTERPRET=1.*impl='fused'"):
        triton_launcher.require("cpu")
    if not torch.cuda.is_available():
        assert not triton_launcher.usable("cuda")
        with pytest.raises(RuntimeError, match="impl='foreach'"):
            triton_launcher.require("cuda")


# ---- without a GPU: every kernel variant still compiles for one (sm_90), through ptxas


def _compile_jobs():
    from lightning_opt.kernels import (
        triton_adamw,
        triton_common,
        triton_grokadamw,
        triton_lamb_lars,
        triton_lion,
        triton_schedule_free,
        triton_sophia,
        triton_stable_adamw,
    )

    jobs = [(triton_common.segment_sums, {"K": 2, "RBLOCK": 1024})]
    for pk in (0, 1, 2):  # float32, float64, bfloat16 (with every rounding switch on)
        low = pk == 2
        sk = 0 if low else pk  # float32 state for bf16 parameters where the family keeps it
        on = {"WD": True, "KAHAN": low, "SR": low}
        b = {"BLOCK": 1024, "PK": pk}
        jobs += [
            (triton_lion._lion_kernel, {**b, "L": 4, "SK": pk, **on}),
            (triton_adamw._adamw_kernel, {**b, "L": 4, "GK": pk, "SK": sk, "WD": True}),
            (
                triton_schedule_free._schedule_free_kernel,
                {**b, "L": 4, "GK": pk, "SK": sk, "DIRECTION": 1, "WD": True, "SR": low},
            ),
            (triton_sophia._sophia_kernel, {**b, "L": 5, "GK": pk, "SK": sk, **on}),
        ]
        for fn in (triton_stable_adamw._stable_partial, triton_stable_adamw._stable_apply):
            jobs.append((fn, {**b, "L": 5, "K": 1, "GK": pk, "SK": pk, "DECOUPLE": True, **on}))
        for fn in (triton_lamb_lars._lamb_partial, triton_lamb_lars._lamb_apply):
            cx = {**b, "L": 5, "K": 2, "SK": sk, "SCALE_PTR": True, "ADAPT": True, "TRUST_CLIP": True, **on}
            jobs.append((fn, cx))
        for fn in (triton_lamb_lars._lars_partial, triton_lamb_lars._lars_apply):
            for fresh in (True, False):
                jobs.append((fn, {**b, "L": 4, "K": 2, "ADAPT": True, "TRUST_CLIP": True, "MOMENTUM": True,
                                  "FRESH": fresh, "NESTEROV": True, **on}))
        for fn in (triton_grokadamw._grok_partial, triton_grokadamw._grok_apply):
            jobs.append((fn, {**b, "L": 6, "K": 1, "SK": pk, "CLIP": True, **on}))
    return jobs


def compile_check() -> None:
    """Compile every kernel variant for sm_90 (no GPU needed: Triton's frontend, LLVM and ptxas)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointers = {"PTRS": "*i64", "SIZES": "*i64", "BLOCKS": "*i64", "FIRST": "*i64", "PART": "*fp64",
                "SUMS": "*fp64", "BETAS": "*fp64", "SEEDS": "*i64"}
    for fn, cx in _compile_jobs():
        wide = "*fp64" if cx.get("PK") == 1 else "*fp32"
        sig = {}
        for p in fn.params:
            if p.is_constexpr:
                sig[p.name] = "constexpr"
            elif p.name in ("OUT", "SCALE"):
                sig[p.name] = wide
            else:
                sig[p.name] = pointers.get(p.name, p.annotation)
        src = ASTSource(fn, sig, constexprs=cx)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})
        ptx = kernel.asm["ptx"]
        # correctly rounded division and square root only (torch's), no approximations
        assert "sqrt.approx.f32" not in ptx and "div.full.f32" not in ptx and "div.approx" not in ptx, fn.__name__
    print("compiled", flush=True)


def _fresh_python(code: str, timeout: int) -> subprocess.CompletedProcess:
    # a fresh process with compiled kernels: this one may run the interpreter (read at import);
    # "0", not unset, so the setdefault at the top of this module keeps it off
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    root = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_a_gpu() -> None:
    proc = _fresh_python("from tests.kernels.test_triton import compile_check; compile_check()", 600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


# ---- on a GPU: the compiled kernels against the same references


def gpu_check() -> None:
    """Every spec and config on CUDA (compiled kernels, references in torch on CUDA); raises on a mismatch."""
    for name, make in SPECS.items():
        spec = make()
        for dtype, wd, rounding in CONFIGS:
            if (rounding == "kahan" and not spec.kahan) or (rounding == "stochastic" and not spec.stochastic):
                continue
            ps, state, rps, rstate = run_case(spec, dtype, wd, rounding, device="cuda", steps=20)
            _assert_equal(spec, ps, state, rps, rstate, loose=rounding == "stochastic")
        print(f"{name}: ok", flush=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the compiled Triton kernels)")
def test_compiled_kernels_on_cuda_equal_the_references() -> None:
    proc = _fresh_python("from tests.kernels.test_triton import gpu_check; gpu_check()", 1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
