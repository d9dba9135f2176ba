"""The optimizers' own ``stochastic_rounding``: fresh bits every step, the same bits in every impl.

Stochastic rounding is unbiased only if each rounding draws new bits. The bits hash the element
index, the unrounded value and a seed; a weight that did not move and takes the same update again
(Lion's exact ``+-lr``, any optimizer on a constant gradient) has the same unrounded value, so the
seed (the tensor's step count) must change: with a fixed seed such a weight rounds the same way at
every step and sits still. Here: the mean drift of bf16 weights under updates far below their
resolution equals ``steps * lr`` for every impl, and every family's state round-trips with it.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

from lightning_opt.optim.grokadamw import GrokAdamW
from lightning_opt.optim.lamb_lars import Lamb, Lars
from lightning_opt.optim.lion import Lion
from lightning_opt.optim.precision import sr_bits, sr_key, stochastic_round
from lightning_opt.optim.schedule_free import AdamWScheduleFree, RAdamScheduleFree, SGDScheduleFree
from lightning_opt.optim.sophia import SophiaG, SophiaH
from lightning_opt.optim.stable_adamw import StableAdamW

BF16 = torch.bfloat16
ULP = 2.0**-7  # bf16's spacing in [1, 2)
LR = ULP / 64  # each step's update: 1/64 of the spacing, exact in float32 at these weights
STEPS = 128

# optimizers whose update on a constant gradient g < 0 is +lr per step (up to float32 rounding):
# Lion (the sign), StableAdamW (m / sqrt(v) = 1 with debiased betas, RMS 1 so lr_t = lr), SophiaG
# before its first Hessian refresh (h = 0: the clipped ratio is 1, a sign step)
DRIFT = {
    "lion": lambda ps, impl: Lion(ps, lr=LR, stochastic_rounding=True, impl=impl),
    "stable_adamw": lambda ps, impl: StableAdamW(ps, lr=LR, weight_decay=0.0, stochastic_rounding=True, impl=impl),
    "sophiag": lambda ps, impl: SophiaG(ps, lr=LR, weight_decay=0.0, stochastic_rounding=True, impl=impl),
}


def _impls() -> list[str]:
    # the Triton kernels run on the CPU only in Triton's interpreter (conftest sets it)
    return ["for_loop", "foreach", "fused"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


def _drift(name: str, impl: str, n: int, steps: int) -> float:
    g = torch.Generator().manual_seed(0)
    # weights in [1.25, 1.5): bf16 values with spacing ULP that stay in [1, 2) while drifting
    p = torch.nn.Parameter((1.25 + 0.25 * torch.rand(n, generator=g)).to(BF16))
    start = p.detach().float().clone()
    opt = DRIFT[name]([p], impl)
    for _ in range(steps):
        p.grad = torch.full_like(p, -1.0)
        opt.step()
    return (p.detach().float() - start).mean().item()


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("name", list(DRIFT))
def test_mean_drift_of_sub_resolution_updates_is_steps_times_lr(name: str, impl: str) -> None:
    # the interpreter is slow: a smaller tensor (the bound scales with it)
    n = 256 if impl == "triton" else 1024
    drift = _drift(name, impl, n, STEPS)
    # unbiased rounding: E[p_T - p_0] = T lr exactly (2 ULP here); the rounding errors are martingale
    # steps of variance <= ULP^2 / 4, so the mean over n weights has a standard error <= sqrt(T / n)
    # ULP / 2 (0.18 ULP; 0.35 ULP for triton). A fixed seed moves a weight only at the first step
    # at each value (probability 1/64), then never again: a drift of ~0.03 ULP.
    expected, se = STEPS * LR, math.sqrt(STEPS / n) * ULP / 2
    assert abs(drift - expected) < 4 * se, f"{name}/{impl}: mean drift {drift:.3e}, expected {expected:.3e} (se {se:.1e})"


def test_seed_changes_the_bits_and_keeps_the_expectation() -> None:
    x = torch.full((1 << 14,), 1.0 + ULP / 4)  # a quarter of the way to the next bf16 value
    assert not torch.equal(sr_bits(x, seed=1), sr_bits(x, seed=2))
    ups = torch.stack([stochastic_round(x, seed=s).float() > 1.0 for s in range(1, 9)]).float()
    # each rounding goes up with probability 1/4, independently across seeds
    assert abs(ups.mean().item() - 0.25) < 0.01
    assert sr_key(0) == 0 and sr_key(1) == 0x9E3779B9 and sr_key(2**40) < 2**32


# every family with its own stochastic rounding, with updates that matter in bf16
ROUND_TRIP = {
    "lion": lambda ps: Lion(ps, lr=1e-3, weight_decay=0.1, stochastic_rounding=True),
    "stable_adamw": lambda ps: StableAdamW(ps, lr=1e-3, stochastic_rounding=True),
    "schedule_free_adamw": lambda ps: AdamWScheduleFree(ps, lr=1e-3, warmup_steps=2, stochastic_rounding=True),
    "schedule_free_radam": lambda ps: RAdamScheduleFree(ps, lr=1e-3, silent_sgd_phase=False, stochastic_rounding=True),
    "schedule_free_sgd": lambda ps: SGDScheduleFree(ps, lr=1e-2, stochastic_rounding=True),
    "lamb": lambda ps: Lamb(ps, lr=1e-3, weight_decay=0.01, stochastic_rounding=True),
    "lars": lambda ps: Lars(ps, lr=0.1, momentum=0.9, weight_decay=1e-4, stochastic_rounding=True),
    "sophiag": lambda ps: SophiaG(ps, lr=1e-3, stochastic_rounding=True),
    "sophiah": lambda ps: SophiaH(ps, lr=1e-3, stochastic_rounding=True),
    "grokadamw": lambda ps: GrokAdamW(ps, lr=1e-3, stochastic_rounding=True),
}
SHAPES = [(16, 8), (8,)]


def _params() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter((1.0 + 0.1 * torch.rand(s, generator=g)).to(BF16)) for s in SHAPES]


def _steps(opt, params, grads) -> None:
    for gs in grads:
        for p, x in zip(params, gs):
            p.grad = x.clone()
        opt.step()


def _grads(steps: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [[(1.0 + 0.3 * torch.randn(s, generator=g)).to(BF16) for s in SHAPES] for _ in range(steps)]


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_state_round_trips_with_stochastic_rounding(name: str) -> None:
    """N steps + save + load + N steps == 2N steps, bit for bit, with stochastic rounding on."""
    make, grads = ROUND_TRIP[name], _grads(8)
    straight = _params()
    _steps(make(straight), straight, grads)
    params = _params()
    opt = make(params)
    _steps(opt, params, grads[:4])
    saved = copy.deepcopy(opt.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = make(resumed)
    opt2.load_state_dict(saved)
    _steps(opt2, resumed, grads[4:])
    for a, b in zip(straight, resumed):
        assert torch.equal(a.detach(), b.detach()), name


@pytest.mark.parametrize("cls", [Lion, Lars])
def test_a_checkpoint_without_the_seed_step_resumes(cls) -> None:
    # Lion and LARS keep a step for the seed only with stochastic_rounding: an older checkpoint
    # lacks it and resumes counting at 0
    params = _params()
    opt = cls(params, lr=1e-3, weight_decay=1e-4, stochastic_rounding=True)
    _steps(opt, params, _grads(2))
    assert [opt.state[p]["step"] for p in params] == [2, 2]
    saved = copy.deepcopy(opt.state_dict())
    for s in saved["state"].values():
        del s["step"]
    opt.load_state_dict(saved)
    _steps(opt, params, _grads(1))
    assert [opt.state[p]["step"] for p in params] == [1, 1]
    plain = cls(_params(), lr=1e-3, weight_decay=1e-4)
    _steps(plain, plain.param_groups[0]["params"], _grads(1))
    assert all("step" not in s for s in plain.state.values())  # nothing kept without it
