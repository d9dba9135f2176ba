"""What the impl-equality tests of the elementwise families share (test_*_impls.py).

The parameter set of odd shapes, the precisions and roundings to run, the impls to compare with
``for_loop`` (the Triton kernels on the CPU only in the interpreter), and the comparison of two runs:
parameters and every state entry.
"""

from __future__ import annotations

import os

import torch

__all__ = ["PRECISIONS", "SHAPES", "STEPS", "_assert_same", "_close", "_grads", "_other_impls", "_params", "_rounding"]

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
