"""The fused CPU kernels' shared pieces (kernels/csrc/common.h, norms.c).

- Cache groups: the two-pass kernels (LAMB, LARS, StableAdamW, GrokAdamW) run both passes over one
  group of consecutive tensors (at most ``LO_GROUP_BYTES`` = 4 MiB of parameters, a larger tensor
  alone) before the next, the first pass backwards. The impl tests' buckets (a few thousand
  elements) are one group; here a bucket spans four, with a tensor larger than a group, and still
  equals ``for_loop`` and itself at 1 and 2 threads.
- :func:`precision.sum_squares` (the global gradient norm's float64 sum): the C kernel equals
  torch's float64 norms for every dtype, strided and mixed-dtype lists, and the torch path is what
  runs where the kernel cannot.
"""

from __future__ import annotations

import pytest
import torch

from lightning_opt.kernels import cpu
from lightning_opt.optim import precision
from lightning_opt.optim.grokadamw import GrokAdamW
from lightning_opt.optim.lamb_lars import Lamb, Lars
from lightning_opt.optim.stable_adamw import StableAdamW

pytestmark = pytest.mark.skipif(not cpu.available("norms"), reason="no C compiler: the fused CPU kernels cannot build")

# float32 elements: groups from the end [3, 7) (801046 elements), [1, 3) (300005), [0, 1) (1.1M > a group alone)
GROUPED = [(1100, 1000), (5,), (300, 1000), (7, 3), (600, 1000), (1025,), (200, 1000)]

TWO_PASS = {
    "lamb": (Lamb, {"lr": 1e-2, "weight_decay": 0.1}),
    "lars": (Lars, {"lr": 1.0, "weight_decay": 1e-4}),
    "stable_adamw": (StableAdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    "grokadamw": (GrokAdamW, {"lr": 1e-2, "weight_decay": 0.1}),
}


def _run(cls, kw: dict, impl: str, dtype: torch.dtype, steps: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in GROUPED]
    grads = [[torch.randn(s, generator=g).to(dtype) for s in GROUPED] for _ in range(steps)]
    opt = cls(params, impl=impl, **kw)
    for step in grads:
        for p, gr in zip(params, step):
            p.grad = gr
        opt.step()
    return [p.detach() for p in params] + [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(TWO_PASS))
def test_a_bucket_of_several_cache_groups_equals_for_loop(name: str, dtype: torch.dtype) -> None:
    cls, kw = TWO_PASS[name]
    for a, b in zip(_run(cls, kw, "fused", dtype), _run(cls, kw, "for_loop", dtype)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", sorted(TWO_PASS))
def test_cache_groups_are_deterministic_across_thread_counts(name: str) -> None:
    cls, kw = TWO_PASS[name]
    threads = torch.get_num_threads()
    try:
        runs = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            runs.append(_run(cls, kw, "fused", torch.float32, steps=2))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _torch_sum_squares(xs: list[torch.Tensor]) -> float:
    return sum(torch.linalg.vector_norm(x, dtype=torch.float64).item() ** 2 for x in xs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_sum_squares_kernel_equals_torch_float64(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(s, generator=g).to(dtype) for s in [(1,), (7, 3), (40000,), (33, 65)]]
    xs.append(torch.randn(20, 30, generator=g).to(dtype).t())  # strided
    got = precision.sum_squares(xs)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert got.item() == pytest.approx(_torch_sum_squares(xs), rel=1e-12)
    # a NaN anywhere makes the sum NaN (a clip factor must see it)
    xs[2][5] = float("nan")
    assert precision.sum_squares(xs).isnan()


def test_sum_squares_mixed_dtypes_and_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(300, generator=g), torch.randn(50, generator=g).bfloat16(), torch.randn(9, generator=g).double()]
    fused = precision.sum_squares(xs).item()
    calls = []
    monkeypatch.setattr(cpu, "launch", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(cpu, "available", lambda family="lion": False)
    fallback = precision.sum_squares(xs).item()
    assert not calls  # the kernel is not asked where it is not available
    assert fused == pytest.approx(_torch_sum_squares(xs), rel=1e-12)
    assert fallback == pytest.approx(fused, rel=1e-12)
    assert precision.sum_squares([]).item() == 0.0


def test_total_norm_is_the_float64_root_rounded_once() -> None:
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(s, generator=g) for s in [(1000, 100), (17,)]]
    got = precision.total_norm("Lamb", xs)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == torch.tensor(_torch_sum_squares(xs) ** 0.5, dtype=torch.float64).float().item()
