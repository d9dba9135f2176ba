"""Lamb and Lars: every ``impl`` equals the ``for_loop`` reference, and the fused state round-trips.

The reference comparisons against pytorch_optimizer and hand recurrences are in test_lamb_lars.py
(they run the default ``impl="auto"``, the fused kernel on the CPU). Tolerances are
``torch.testing.assert_close``'s defaults for the parameter dtype, for stochastic rounding too: the
kernels mirror torch's roundings and every impl takes float64-accumulated norms and correctly
rounded roots, so they agree (measured: bit for bit on this CPU).
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

from lightning_opt.optim.lamb_lars import Lamb, Lars

SHAPES = [(1,), (5,), (1025,), (7, 3), (33, 65)]
STEPS = 20

# (param dtype, rounding): stochastic rounding exists for bfloat16 only
PRECISIONS = [
    (torch.float32, "nearest"),
    (torch.float32, "kahan"),
    (torch.bfloat16, "nearest"),
    (torch.bfloat16, "kahan"),
    (torch.bfloat16, "stochastic"),
]


def _other_impls(cls) -> list[str]:
    # the Triton kernels run on the CPU only in the interpreter
    keep = ("triton",) if os.environ.get("TRITON_INTERPRET") == "1" else ()
    return [i for i in cls.impls if i != "for_loop" and (i != "triton" or i in keep)]


def _params(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in SHAPES]


def _grads(dtype: torch.dtype, steps: int = STEPS) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [[torch.randn(s, generator=g).to(dtype) for s in SHAPES] for _ in range(steps)]


def _rounding(rounding: str) -> dict:
    return {"kahan_sum": rounding == "kahan", "stochastic_rounding": rounding == "stochastic"}


def _run(cls, impl: str, dtype: torch.dtype, grads, late: int | None = None, **kw):
    """``late``: that tensor gets no gradient for the first 3 steps (its step count and momentum
    buffer start later than the others')."""
    params = _params(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no param group is adapted" for the wd=0 cases, on purpose
        opt = cls(params, impl=impl, **kw)
    for t, step in enumerate(grads):
        for i, (p, g) in enumerate(zip(params, step)):
            p.grad = None if i == late and t < 3 else g.clone()
        opt.step()
    return params, opt


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    # stochastic rounding too: its bits hash the unrounded float32 value, so this holds only because
    # every impl computes that value with torch's roundings (the kernels mirror torch's FMAs, take
    # float64-accumulated norms and correctly rounded roots; the reference takes the same)
    torch.testing.assert_close(a, b, msg=lambda m: f"{what}: {m}")


def _assert_same(a_params, a_opt, b_params, b_opt) -> None:
    for pa, pb in zip(a_params, b_params):
        assert pa.dtype == pb.dtype
        _close(pa.detach(), pb.detach(), "param")
        sa, sb = a_opt.state[pa], b_opt.state[pb]
        assert sa.keys() == sb.keys()
        for key in sa:
            if key == "kahan_comp":
                # the buffer is p's rounding residue: a one-ulp difference in p moves it by that ulp,
                # so compare the value p + comp that the pair represents (in float32), up to a few
                # ulps of the bf16 buffer itself (|comp| reaches a few ulps of p: rtol 2**-10 of p)
                assert sa[key].dtype == sb[key].dtype == pa.dtype
                torch.testing.assert_close(
                    pa.detach().float() + sa[key].float(),
                    pb.detach().float() + sb[key].float(),
                    rtol=2**-10,
                    atol=1e-5,
                )
            elif isinstance(sa[key], torch.Tensor):
                assert sa[key].dtype == sb[key].dtype, key
                _close(sa[key], sb[key], f"state {key!r}")
            else:
                assert sa[key] == sb[key], key


LAMB_CASES = [
    {"weight_decay": 0.0, "late": 2},  # not adapted (NVLAMB: wd=0 groups get plain Adam)
    {"weight_decay": 0.0, "always_adapt": True, "trust_clip": True},
    {"weight_decay": 0.1, "grad_averaging": False},
    {"weight_decay": 0.1, "bias_correction": False, "max_grad_norm": 0.0},
]


@pytest.mark.parametrize("impl", _other_impls(Lamb))
@pytest.mark.parametrize("dtype, rounding", PRECISIONS)
@pytest.mark.parametrize("kw", LAMB_CASES)
def test_lamb_impls_equal_for_loop(impl: str, dtype: torch.dtype, rounding: str, kw: dict) -> None:
    grads = _grads(dtype)
    kw = {"lr": 1e-2, **kw, **_rounding(rounding)}
    ours, ref = _run(Lamb, impl, dtype, grads, **kw), _run(Lamb, "for_loop", dtype, grads, **kw)
    _assert_same(*ours, *ref)


LARS_CASES = [
    {"weight_decay": 0.0, "late": 2},  # not adapted: torch SGD with momentum
    {"weight_decay": 0.0, "always_adapt": True, "momentum": 0.0},
    {"weight_decay": 1e-2, "nesterov": True},
    {"weight_decay": 1e-2, "dampening": 0.1, "trust_clip": True, "late": 4},
]


@pytest.mark.parametrize("impl", _other_impls(Lars))
@pytest.mark.parametrize("dtype, rounding", PRECISIONS)
@pytest.mark.parametrize("kw", LARS_CASES)
def test_lars_impls_equal_for_loop(impl: str, dtype: torch.dtype, rounding: str, kw: dict) -> None:
    grads = _grads(dtype)
    kw = {"lr": 0.5, **kw, **_rounding(rounding)}
    ours, ref = _run(Lars, impl, dtype, grads, **kw), _run(Lars, "for_loop", dtype, grads, **kw)
    _assert_same(*ours, *ref)


@pytest.mark.parametrize(
    "cls, kw",
    [
        (Lamb, {"lr": 1e-2, "weight_decay": 0.1}),
        (Lars, {"lr": 0.5, "weight_decay": 1e-2, "nesterov": True}),
    ],
)
@pytest.mark.parametrize(
    "dtype, rounding", [(torch.float32, "nearest"), (torch.bfloat16, "kahan"), (torch.bfloat16, "stochastic")]
)
def test_fused_resume_equals_straight_run(cls, kw: dict, dtype: torch.dtype, rounding: str) -> None:
    """N steps, save, load into a fresh optimizer, N steps == 2N steps (bit for bit)."""
    n = 6
    grads = _grads(dtype, 2 * n)
    kw = {**kw, **_rounding(rounding), "impl": "fused"}
    straight, _ = _run(cls, "fused", dtype, grads, **{k: v for k, v in kw.items() if k != "impl"})

    first, opt = _run(cls, "fused", dtype, grads[:n], **{k: v for k, v in kw.items() if k != "impl"})
    saved = copy.deepcopy(opt.state_dict())
    resumed = [p.detach().clone().requires_grad_() for p in first]
    fresh = cls(resumed, **kw)
    fresh.load_state_dict(saved)
    for step in grads[n:]:
        for p, g in zip(resumed, step):
            p.grad = g.clone()
        fresh.step()
    for a, b in zip(straight, resumed):
        assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize(
    "cls, kw",
    [
        (Lamb, {"lr": 1e-2, "weight_decay": 0.1}),
        (Lamb, {"lr": 1e-2, "weight_decay": 0.0}),
        (Lars, {"lr": 0.5, "weight_decay": 1e-2}),
    ],
)
@pytest.mark.parametrize("impl", _other_impls(Lamb))
def test_stochastic_rounding_one_step(cls, kw: dict, impl: str) -> None:
    """One step from the same state: every impl rounds stochastically with the shared hash (the
    reference's bits, so the same results), not to nearest."""
    grads = _grads(torch.bfloat16, 1)
    ours, _ = _run(cls, impl, torch.bfloat16, grads, stochastic_rounding=True, **kw)
    ref, _ = _run(cls, "for_loop", torch.bfloat16, grads, stochastic_rounding=True, **kw)
    nearest, _ = _run(cls, "for_loop", torch.bfloat16, grads, **kw)
    a, b, c = (torch.cat([p.detach().float().reshape(-1) for p in ps]) for ps in (ours, ref, nearest))
    assert torch.equal(a, b)
    assert (b != c).float().mean() > 0.05  # rounding to nearest would differ on many elements


def test_fused_is_deterministic_across_thread_counts() -> None:
    """The trust-ratio norms are summed per chunk in chunk order: the thread count changes nothing."""
    big = [(40000,), (70000,)]
    g = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=g) for s in big]
    grads = [[torch.randn(s, generator=g) for s in big] for _ in range(3)]
    results = []
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            params = [x.clone().requires_grad_() for x in init]
            opt = Lamb(params, lr=1e-2, weight_decay=0.1, impl="fused")
            for step in grads:
                for p, gr in zip(params, step):
                    p.grad = gr.clone()
                opt.step()
            results.append([p.detach() for p in params])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [Lamb, Lars])
def test_impl_and_rounding_options_are_checked(cls) -> None:
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match=r"impl='fuzed'"):
        cls(p, impl="fuzed", weight_decay=0.1)
    with pytest.raises(ValueError, match="choose one rounding"):
        cls(p, kahan_sum=True, stochastic_rounding=True, weight_decay=0.1)
    opt = cls(p, weight_decay=0.1)
    with pytest.raises(ValueError, match=r"impl='cuda'"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "impl": "cuda"})
    for group in opt.param_groups:  # as unpickled from before the options
        del group["impl"], group["stochastic_rounding"]
    opt.__setstate__(opt.__getstate__())
    assert opt.param_groups[0]["impl"] == "auto" and opt.param_groups[0]["stochastic_rounding"] is False
