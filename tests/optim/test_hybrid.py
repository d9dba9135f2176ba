"""The pieces Muon and APOLLO share (optim._hybrid): the matrix-vs-AdamW routing and the AdamW side.

Every AdamW-side impl equals the ``for_loop`` reference (``optim.base.adamw_update_`` per tensor),
which equals ``torch.optim.AdamW``, over 20 steps on odd shapes, fp32 and bf16 parameters (float32
moments), weight decay on and off, tensors at different step counts in one call.
"""

from __future__ import annotations

import pytest
import torch

from lightning_opt.optim._hybrid import ADAMW_SIDE_IMPLS, adamw_side, adamw_state_, route_matrices
from lightning_opt.optim.base import DEFAULT_ADAMW_PATTERNS

SHAPES = [(1,), (5,), (1025,), (7, 3), (33, 65)]
HP = {"lr": 3e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}


def _run_side(impl: str, dtype: torch.dtype, wd: float, steps: int = 20) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).to(dtype) for s in SHAPES]
    states = [{} for _ in params]
    for k in range(steps):
        grads = [torch.randn(s, generator=g).to(dtype) for s in SHAPES]
        # tensor 1 joins late: its step count differs from the others' in the same call
        live = [i for i in range(len(params)) if i != 1 or k >= 5]
        for i in live:
            adamw_state_(states[i], params[i])
            states[i]["step"] += 1
        adamw_side(
            [params[i] for i in live],
            [grads[i] for i in live],
            [states[i]["exp_avg"] for i in live],
            [states[i]["exp_avg_sq"] for i in live],
            [states[i]["step"] for i in live],
            weight_decay=wd,
            impl=impl,
            **HP,
        )
    return params + [s[k] for s in states for k in ("exp_avg", "exp_avg_sq")]


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.dtype == ref.dtype
    if ref.dtype is torch.bfloat16:
        step = torch.finfo(ref.dtype).eps * float(ref.abs().max())
        torch.testing.assert_close(got, ref, rtol=1.6e-2, atol=max(step, 1e-5))
    else:
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", [i for i in ADAMW_SIDE_IMPLS if i != "for_loop"] + ["auto"])
def test_adamw_side_impls_equal_for_loop(impl: str, dtype: torch.dtype, wd: float) -> None:
    ref = _run_side("for_loop", dtype, wd)
    got = _run_side(impl, dtype, wd)
    for a, b in zip(got, ref):
        _close(a, b)
    # the moments of bf16 parameters are float32
    assert {t.dtype for t in got[len(SHAPES) :]} == {torch.float32}


def test_adamw_side_float64_matches_torch_adamw() -> None:
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    ref = [t.clone().requires_grad_() for t in init]
    opt = torch.optim.AdamW(ref, lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"], weight_decay=0.1)
    for impl in ("for_loop", "foreach", "fused"):
        ours = [t.clone() for t in init]
        states = [{} for _ in ours]
        gg = torch.Generator().manual_seed(1)
        for _ in range(10):
            grads = [torch.randn(s, generator=gg, dtype=torch.float64) for s in SHAPES]
            for st, p in zip(states, ours):
                adamw_state_(st, p)
                st["step"] += 1
            adamw_side(
                ours,
                grads,
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states],
                weight_decay=0.1,
                impl=impl,
                **HP,
            )
            if impl == "for_loop":
                for p, gr in zip(ref, grads):
                    p.grad = gr
                opt.step()
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)


def test_adamw_side_fused_refuses_a_gpu_tensor_with_a_hint() -> None:
    p = torch.zeros(3, device="meta")
    with pytest.raises(RuntimeError, match="impl='triton' or 'foreach'"):
        adamw_side([p], [p], [p], [p], [1], weight_decay=0.0, impl="fused", **HP)


def test_route_by_shape_name_and_override() -> None:
    params = [torch.zeros(4, 4), torch.zeros(4), torch.zeros(10, 4), torch.zeros(2, 3, 3, 3)]
    names = ["layers.0.weight", "layers.0.bias", "embed.weight", "conv.weight"]
    kw = {"cls": "Muon", "override_key": "use_muon", "exclude": DEFAULT_ADAMW_PATTERNS}
    assert route_matrices(params, names, **kw) == [True, False, False, False]
    assert route_matrices(params, names, **kw, flatten_conv=True) == [True, False, False, True]
    # without names only the shape decides
    assert route_matrices(params, None, **kw) == [True, False, True, False]
    # include: only the matching matrices; unnamed ones never match
    assert route_matrices(params, names, cls="APOLLO", override_key="use_apollo", include=[r"embed"]) == [
        False,
        False,
        True,
        False,
    ]
    assert route_matrices(params[:1], None, cls="APOLLO", override_key="use_apollo", include=[r"."]) == [False]
    assert route_matrices(params[:1], names[:1], **kw, override=False) == [False]
    assert route_matrices(params[2:3], names[2:3], **kw, override=True) == [True]


def test_route_override_errors_name_the_tensor_and_the_fix() -> None:
    kw = {"cls": "Muon", "override_key": "use_muon"}
    with pytest.raises(ValueError, match=r"Muon: param group has use_muon=True but b has shape \(4,\)"):
        route_matrices([torch.zeros(4)], ["b"], **kw, override=True)
    with pytest.raises(ValueError, match="set flatten_conv=True"):
        route_matrices([torch.zeros(2, 2, 2)], None, **kw, override=True)
    with pytest.raises(ValueError, match="APOLLO projects 2-D weights only"):
        route_matrices(
            [torch.zeros(2, 2, 2)],
            None,
            cls="APOLLO",
            override_key="use_apollo",
            override=True,
            flatten_conv=None,
            matrix_hint="APOLLO projects 2-D weights only",
        )
    with pytest.raises(ValueError, match=r"use_muon='yes'.*True or False"):
        route_matrices([torch.zeros(2, 2)], None, **kw, override="yes")
