"""Shampoo against pytorch_optimizer's Shampoo and ScalableShampoo, and against a float64 recurrence.

``pytorch_optimizer.Shampoo`` is plain Shampoo (sums started at ``eps I``, roots by SVD every
``preconditioning_compute_steps``, full-matrix factors for 1-D tensors); ``ScalableShampoo`` (Google's
Scalable Shampoo) adds blocking, grafting (per tensor), a start step, momentum/Nesterov and an EMA of
the factors. Each option of ours that one of them has is compared over 12 steps with the same
weights and gradients, in float64 and float32. What neither has (Meta's filtered gradient with bias
correction, the factors' bias correction, Adam grafting, grafting per block of a blocked tensor,
Meta's order of decay and momentum, merged dims) is checked against :func:`_recurrence`, written
here from the equations in plain loops over blocks with numpy.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pytorch_optimizer import ScalableShampoo as RefScalable
from pytorch_optimizer import Shampoo as RefShampoo
from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting

from lightning_opt import build_optimizer, get_optimizer_info
from lightning_opt.optim.shampoo import (
    Shampoo,
    shampoo_apply_,
    shampoo_direction,
    shampoo_init_state_,
    shampoo_inverse_root,
    shampoo_layout,
    shampoo_precondition_,
)

STEPS = 12


def _init(dtype: torch.dtype, shapes) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def _grads(init: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in init]


def _run(make, init: list[torch.Tensor], steps: int = STEPS, start: int = 0) -> list[torch.Tensor]:
    params = [t.clone().requires_grad_() for t in init]
    opt = make(params)
    for s in range(start, start + steps):
        for p, g in zip(params, _grads(init, s)):
            p.grad = g
        opt.step()
    return [p.detach() for p in params]


def _close(ours: list[torch.Tensor], ref: list[torch.Tensor], **tol) -> None:
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, msg=lambda m, s=tuple(o.shape): f"{s}: {m}", **tol)


# ----------------------------------------------------------------------------------------------
# pytorch_optimizer.Shampoo: plain Shampoo, roots every step, coupled or decoupled decay

_PLAIN = {"betas": (0.0, None), "grafting": "none", "precondition_frequency": 1, "precondition_1d": True}
PLAIN_SHAPES = ((16, 16), (12, 20), (7,), (4, 3, 5))
PLAIN_CONFIGS = {
    "no_decay": ({}, {}),
    "decoupled_decay": ({"weight_decay": 0.1}, {"weight_decay": 0.1, "weight_decouple": True}),
    "coupled_decay": (
        {"weight_decay": 0.1, "use_decoupled_weight_decay": False},
        {"weight_decay": 0.1, "weight_decouple": False},
    ),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", sorted(PLAIN_CONFIGS))
def test_matches_pytorch_optimizer_shampoo(config: str, dtype: torch.dtype) -> None:
    ours_kw, ref_kw = PLAIN_CONFIGS[config]
    init = _init(dtype, PLAIN_SHAPES)
    kw = {"lr": 1e-2, "epsilon": 1e-6, **_PLAIN, **ours_kw}
    ours = _run(lambda ps: Shampoo(ps, **kw), init)
    ref = _run(lambda ps: RefShampoo(ps, lr=1e-2, matrix_eps=1e-6, **ref_kw), init)
    _close(ours, ref)
    if dtype is torch.float64:  # the preconditioner matters: SGD with the same lr lands elsewhere
        sgd = _run(lambda ps: torch.optim.SGD(ps, lr=1e-2), init)
        assert all((o - s).abs().max() > 1e-2 for o, s in zip(ours, sgd))


# ----------------------------------------------------------------------------------------------
# pytorch_optimizer.ScalableShampoo: blocking, frequency, start step, grafting, momentum, EMA

SCALABLE_SHAPES = ((16, 16), (12, 20), (7,), (4, 3, 5))
_REF_BASE = {
    "use_svd": True,
    "shape_interpretation": False,  # its merge_small_dims turns (16, 16) into shape [1]
    "moving_average_for_momentum": False,
    "decoupled_learning_rate": True,
    "nesterov": False,
    "matrix_eps": 1e-10,
    "diagonal_eps": 1e-8,
    "block_size": 64,
}
_OURS_BASE = {"epsilon": 1e-10, "grafting_epsilon": 1e-8, "use_bias_correction": False, "max_preconditioner_dim": 64}
_G = LayerWiseGrafting
# name -> (ours, reference); beta2=0.9 everywhere (the reference has no plain sum), beta1 of the
# reference is its momentum; start == frequency where momentum is on (the reference keeps a second
# momentum for its grafting phase, equal to ours only with SGD grafting and identity roots)
SCALABLE_CONFIGS = {
    "blocks_of_8": (
        {"max_preconditioner_dim": 8, "grafting": "none", "precondition_frequency": 3},
        {"block_size": 8, "graft_type": _G.NONE, "preconditioning_compute_steps": 3, "start_preconditioning_step": 3},
    ),
    "graft_sgd": (
        {"grafting": "sgd", "precondition_frequency": 2, "start_preconditioning_step": 4},
        {"graft_type": _G.SGD, "preconditioning_compute_steps": 2, "start_preconditioning_step": 4},
    ),
    "graft_adagrad": (
        {"grafting": "adagrad", "precondition_frequency": 2, "start_preconditioning_step": 4},
        {"graft_type": _G.ADAGRAD, "preconditioning_compute_steps": 2, "start_preconditioning_step": 4},
    ),
    "graft_rmsprop": (
        {"grafting": "rmsprop", "grafting_beta2": 0.9, "precondition_frequency": 3},
        {"graft_type": _G.RMSPROP, "preconditioning_compute_steps": 3, "start_preconditioning_step": 3},
    ),
    "momentum": (
        {"grafting": "sgd", "momentum": 0.9, "precondition_frequency": 3},
        {"graft_type": _G.SGD, "preconditioning_compute_steps": 3, "start_preconditioning_step": 3, "_beta1": 0.9},
    ),
    "nesterov": (
        {"grafting": "sgd", "momentum": 0.9, "use_nesterov": True, "precondition_frequency": 3},
        {
            "graft_type": _G.SGD,
            "preconditioning_compute_steps": 3,
            "start_preconditioning_step": 3,
            "nesterov": True,
            "_beta1": 0.9,
        },
    ),
    "inv_root_override": (
        {"grafting": "none", "inv_root_override": 2, "precondition_frequency": 2},
        {"graft_type": _G.NONE, "inverse_exponent_override": 2, "preconditioning_compute_steps": 2,
         "start_preconditioning_step": 2},
    ),
    "decoupled_decay": (
        {"grafting": "adagrad", "weight_decay": 0.1, "precondition_frequency": 3},
        {"graft_type": _G.ADAGRAD, "weight_decay": 0.1, "decoupled_weight_decay": True,
         "preconditioning_compute_steps": 3, "start_preconditioning_step": 3},
    ),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", sorted(SCALABLE_CONFIGS))
def test_matches_pytorch_optimizer_scalable_shampoo(config: str, dtype: torch.dtype) -> None:
    ours_kw, ref_kw = SCALABLE_CONFIGS[config]
    ref_kw = dict(ref_kw)
    beta1 = ref_kw.pop("_beta1", 0.0)
    init = _init(dtype, SCALABLE_SHAPES)
    ours = _run(lambda ps: Shampoo(ps, lr=1e-2, betas=(0.0, 0.9), **{**_OURS_BASE, **ours_kw}), init)
    ref = _run(lambda ps: RefScalable(ps, lr=1e-2, betas=(beta1, 0.9), **{**_REF_BASE, **ref_kw}), init)
    # the reference's regularizer is its initial eps I decayed with the sums (beta2^t eps), ours a
    # constant eps: 1e-10 apart here, far below float64's tolerance
    _close(ours, ref)


def test_scalable_reference_is_not_trivially_close() -> None:
    """Each option moves the trajectory: without it (or with another grafting) the run lands elsewhere."""
    init = _init(torch.float64, SCALABLE_SHAPES)

    def ours(**kw):
        return _run(lambda ps: Shampoo(ps, lr=1e-2, betas=(0.0, 0.9), **{**_OURS_BASE, **kw}), init)

    base = {"grafting": "none", "precondition_frequency": 3}
    plain = ours(**base)
    for change in ({"max_preconditioner_dim": 8}, {"inv_root_override": 2}, {"grafting": "adagrad"},
                   {"momentum": 0.9, "grafting": "sgd"}, {"precondition_frequency": 1}):
        other = ours(**{**base, **change})
        assert max(float((a - b).abs().max()) for a, b in zip(plain, other)) > 1e-4, change


# ----------------------------------------------------------------------------------------------
# the full-featured variant against a float64 recurrence written from the equations


def _blocks(shape: tuple[int, ...], b: int) -> list[tuple[slice, ...]]:
    ranges = [[slice(s, min(s + b, n)) for s in range(0, n, b)] for n in shape]
    out: list[tuple[slice, ...]] = [()]
    for r in ranges:
        out = [prefix + (s,) for prefix in out for s in r]
    return out


def _inv_root(F: np.ndarray, r: int, eps: float) -> np.ndarray:
    lam, Q = np.linalg.eigh(F)
    lam = lam - min(lam.min(), 0.0) + eps
    return (Q * lam ** (-1.0 / r)) @ Q.T


def _recurrence(init, steps, *, shapes, lr, b1, b2, eps, mom, nesterov, wd, decoupled, bmax, freq, start,
                graft, gb2, geps, root_override=0):
    """Meta's Shampoo step, one parameter and one block at a time, in numpy float64.

    ``shapes[i]`` is the shape parameter ``i`` is preconditioned in (after merging dims), or
    ``None`` for a diagonal parameter.
    """
    params = [t.double().numpy().copy() for t in init]
    state = []
    for p, shp in zip(params, shapes):
        s = {"m": np.zeros(p.shape), "v": np.zeros(p.shape), "buf": np.zeros(p.shape)}
        if shp is not None:
            s["blocks"] = _blocks(shp, bmax)
            s["F"] = [[np.zeros((sl.stop - sl.start,) * 2) for sl in blk] for blk in s["blocks"]]
            s["X"] = [[None for _ in blk] for blk in s["blocks"]]
        state.append(s)
    for t in range(1, steps + 1):
        grads = _grads(init, t - 1)
        for i, (p, shp, s) in enumerate(zip(params, shapes, state)):
            G = grads[i].double().numpy().copy()
            if wd and not decoupled:
                G = G + wd * p
            due = t == start or (t > start and t % freq == 0)
            if shp is not None:
                Gs = G.reshape(shp)
                for blk, Fs, Xs in zip(s["blocks"], s["F"], s["X"]):
                    B = Gs[blk]
                    for k in range(len(Fs)):  # B unfolded along dim k: L = B B^T, R = B^T B for a matrix
                        unfold = np.moveaxis(B, k, 0).reshape(B.shape[k], -1)
                        outer = unfold @ unfold.T
                        Fs[k] = b2 * Fs[k] + (1 - b2) * outer if b2 is not None else Fs[k] + outer
                    if due:
                        bc2 = 1 - b2**t if b2 is not None else 1.0
                        r = root_override or 2 * B.ndim
                        for k in range(len(Fs)):
                            Xs[k] = _inv_root(Fs[k] / bc2, r, eps)
            if graft == "adagrad":
                s["v"] = s["v"] + G * G
            elif graft in ("adam", "rmsprop"):
                s["v"] = gb2 * s["v"] + (1 - gb2) * G * G
            if b1 > 0:
                s["m"] = b1 * s["m"] + (1 - b1) * G
                Gf = s["m"] / (1 - b1**t)
            else:
                Gf = G
            if graft == "adam":
                Pg = Gf / (np.sqrt(s["v"] / (1 - gb2**t)) + geps)
            elif graft in ("adagrad", "rmsprop"):
                Pg = Gf / (np.sqrt(s["v"]) + geps)
            else:
                Pg = Gf
            if shp is None or t < start:
                P = Pg
            else:
                P = np.empty(shp)
                Gfs, Pgs = Gf.reshape(shp), Pg.reshape(shp)
                for blk, Xs in zip(s["blocks"], s["X"]):
                    Pb = Gfs[blk]
                    for k, X in enumerate(Xs):  # the mode-k product (X_1 B X_2 for a matrix)
                        Pb = np.moveaxis(np.tensordot(X, Pb, axes=([1], [k])), 0, k)
                    if graft != "none":
                        Pb = Pb * np.linalg.norm(Pgs[blk]) / (np.linalg.norm(Pb) + 1e-16)
                    P[blk] = Pb
                P = P.reshape(p.shape)
            if wd and decoupled:
                P = P + wd * p
            if mom:
                s["buf"] = mom * s["buf"] + P
                P = P + mom * s["buf"] if nesterov else s["buf"]
            params[i] = p - lr * P
    return [torch.from_numpy(p) for p in params]


FULL_SHAPES = ((20, 12), (6, 6), (10,), (6, 2, 2, 2), (1, 10))


def test_full_featured_matches_float64_recurrence() -> None:
    """Blocking + Adam grafting per block + frequency + start step + filtered gradient + factor EMA
    with bias correction + Nesterov momentum + decoupled decay, 1-D diagonal."""
    kw = {"lr": 1e-2, "betas": (0.9, 0.95), "epsilon": 1e-8, "momentum": 0.5, "use_nesterov": True,
          "weight_decay": 0.1, "max_preconditioner_dim": 8, "precondition_frequency": 3,
          "start_preconditioning_step": 4, "grafting": "adam", "grafting_beta2": 0.99, "grafting_epsilon": 1e-8}
    init = _init(torch.float64, FULL_SHAPES)
    ours = _run(lambda ps: Shampoo(ps, **kw), init)
    ref = _recurrence(init, STEPS, shapes=[(20, 12), (6, 6), None, (6, 2, 2, 2), (1, 10)], lr=1e-2, b1=0.9,
                      b2=0.95, eps=1e-8, mom=0.5, nesterov=True, wd=0.1, decoupled=True, bmax=8, freq=3, start=4,
                      graft="adam", gb2=0.99, geps=1e-8)
    assert shampoo_layout((20, 12), 8, False, False)[1][-1] == (slice(16, 20), slice(8, 12))
    _close(ours, ref)
    # grafting is per block: with one norm per tensor (the reference optimizers') the run differs
    per_tensor = _run(lambda ps: Shampoo(ps, **{**kw, "max_preconditioner_dim": 64}), init)
    assert (ours[0] - per_tensor[0]).abs().max() > 1e-4


def test_merged_dims_and_1d_factors_match_float64_recurrence() -> None:
    """merge_dims (conv kernel (6,2,2,2) -> (6, 8), (1, 10) -> (10,)), full-matrix 1-D factors, AdaGrad
    grafting, the factors' plain sum (beta2=None), coupled decay, no filtering, a root override."""
    kw = {"lr": 1e-2, "betas": (0.0, None), "epsilon": 1e-6, "weight_decay": 0.05,
          "use_decoupled_weight_decay": False, "max_preconditioner_dim": 8, "precondition_frequency": 2,
          "grafting": "adagrad", "merge_dims": True, "precondition_1d": True, "inv_root_override": 3}
    init = _init(torch.float64, FULL_SHAPES)
    ours = _run(lambda ps: Shampoo(ps, **kw), init)
    assert [shampoo_layout(s, 8, True, True)[0] for s in FULL_SHAPES] == [(20, 12), (6, 6), (10,), (6, 8), (10,)]
    ref = _recurrence(init, STEPS, shapes=[(20, 12), (6, 6), (10,), (6, 8), (10,)], lr=1e-2, b1=0.0, b2=None,
                      eps=1e-6, mom=0.0, nesterov=False, wd=0.05, decoupled=False, bmax=8, freq=2, start=2,
                      graft="adagrad", gb2=0.0, geps=1e-8, root_override=3)
    _close(ours, ref)


# ----------------------------------------------------------------------------------------------
# pieces


def test_layout_blocks_and_merge_rule() -> None:
    assert shampoo_layout((7,), 1024, False, False) is None
    assert shampoo_layout((), 1024, False, True) == ((1,), ((slice(0, 1),),))
    merged, blocks = shampoo_layout((20, 12), 8, False, False)
    assert merged == (20, 12) and len(blocks) == 6
    assert [tuple(s.stop - s.start for s in b) for b in blocks] == [(8, 8), (8, 4), (8, 8), (8, 4), (4, 8), (4, 4)]

    def meta_merge(shape, limit):  # Meta's merge_small_dims, restated: drop 1s, merge while <= limit
        dims = [d for d in shape if d != 1] or [1]
        out = [dims[0]]
        for d in dims[1:]:
            if out[-1] * d <= limit:
                out[-1] *= d
            else:
                out.append(d)
        return tuple(out)

    for shape in [(64, 32, 3, 3), (1, 512), (3, 1, 2000), (2000, 2, 1, 3), (2, 2000, 3), (1, 1), (8, 4, 3, 3)]:
        assert shampoo_layout(shape, 1000, True, False)[0] == meta_merge(shape, 1000), shape


def test_inverse_root_matches_numpy_and_regularizes() -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 4, generator=g, dtype=torch.float64)
    F = A @ A.T  # rank 4 of 6: epsilon makes the root finite
    X = shampoo_inverse_root(F, root=4, epsilon=1e-3, bias_correction=0.5)
    torch.testing.assert_close(X, torch.from_numpy(_inv_root(F.numpy() / 0.5, 4, 1e-3)))
    Xf = shampoo_inverse_root(F.float(), root=4, epsilon=1e-3, dtype=torch.float64)
    assert Xf.dtype == torch.float32
    Xf32 = shampoo_inverse_root(F.float(), root=4, epsilon=1e-3)
    ref = shampoo_inverse_root(F, root=4, epsilon=1e-3)
    assert (Xf.double() - ref).abs().max() <= (Xf32.double() - ref).abs().max()
    with pytest.raises(RuntimeError, match="not finite"):
        shampoo_inverse_root(torch.full((2, 2), float("nan")), root=4, epsilon=1e-3)


def test_phases_compose_to_the_step() -> None:
    init = _init(torch.float64, FULL_SHAPES)
    kw = {"betas": (0.9, 0.95), "momentum": 0.5, "weight_decay": 0.1, "max_preconditioner_dim": 8,
          "precondition_frequency": 2}
    ref = _run(lambda ps: Shampoo(ps, **kw), init, steps=6)
    params = [t.clone() for t in init]
    states = [{} for _ in params]
    for s in range(6):
        for p, g, state in zip(params, _grads(init, s), states):
            layout = shampoo_layout(tuple(p.shape), 8, False, False)
            shampoo_init_state_(p, state, layout=layout, grafting="adam", beta1=0.9, momentum=0.5)
            shampoo_precondition_(g, state, layout=layout, beta2=0.95, epsilon=1e-12, precondition_frequency=2,
                                  start_preconditioning_step=2, inv_root_override=0, use_bias_correction=True,
                                  root_dtype=None)
            d = shampoo_direction(g, state, layout=layout, beta1=0.9, use_bias_correction=True, grafting="adam",
                                  grafting_beta2=0.999, grafting_epsilon=1e-8, start_preconditioning_step=2)
            shampoo_apply_(p, d, state, lr=1e-3, weight_decay=0.1, momentum=0.5, use_nesterov=False)
    for a, b in zip(params, ref):
        assert torch.equal(a, b)


IMPL_SHAPES = ((16, 16), (16, 16), (20, 12), (7,), (7,), (4, 3, 5), (1, 10))
_IMPL_KW = {"betas": (0.9, 0.95), "momentum": 0.5, "use_nesterov": True, "weight_decay": 0.1,
            "max_preconditioner_dim": 8, "precondition_frequency": 2, "start_preconditioning_step": 3,
            "grafting": "adam", "lr": 1e-2}


@pytest.mark.parametrize("extra", [{}, {"grafting": "none", "use_decoupled_weight_decay": False},
                                   {"precondition_1d": True, "merge_dims": True, "grafting": "adagrad"}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_foreach_equals_for_loop(dtype: torch.dtype, extra: dict) -> None:
    init = _init(dtype, IMPL_SHAPES)
    runs = {}
    for impl in ("for_loop", "foreach"):
        params = [t.clone().requires_grad_() for t in init]
        opt = Shampoo(params, **{**_IMPL_KW, **extra}, impl=impl)
        for s in range(8):
            for p, g in zip(params, _grads(init, s)):
                p.grad = g
            opt.step()
        runs[impl] = (params, opt)
    (ref, ref_opt), (got, got_opt) = runs["for_loop"], runs["foreach"]
    tol = {"rtol": 1.6e-2, "atol": 1e-2} if dtype is torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
    for a, b in zip(ref, got):
        assert b.dtype == dtype
        torch.testing.assert_close(b, a, **tol)
    for a, b in zip(ref, got):  # the statistics and roots run per tensor in both: bitwise equal
        sa, sb = ref_opt.state[a], got_opt.state[b]
        for key in ("factors", "roots"):
            assert len(sa.get(key, [])) == len(sb.get(key, []))
            assert all(torch.equal(x, y) for x, y in zip(sa.get(key, []), sb.get(key, [])))


@pytest.mark.parametrize("impl", ["for_loop", "foreach"])
@pytest.mark.parametrize(("dtype", "root_dtype"), [(torch.float32, "float64"), (torch.bfloat16, None)])
def test_save_load_resume_is_exact_across_a_refresh(dtype: torch.dtype, root_dtype, impl: str) -> None:
    init = _init(dtype, IMPL_SHAPES)
    kw = {**_IMPL_KW, "root_dtype": root_dtype, "impl": impl}
    straight = _run(lambda ps: Shampoo(ps, **kw), init, steps=8)
    params = [t.clone().requires_grad_() for t in init]
    opt1 = Shampoo(params, **kw)
    for s in range(5):  # past the start step (3) and a refresh (4)
        for p, g in zip(params, _grads(init, s)):
            p.grad = g
        opt1.step()
    saved = copy.deepcopy(opt1.state_dict())
    opt2 = Shampoo(params, **kw)
    opt2.load_state_dict(saved)
    state = opt2.state[params[0]]
    assert state["factors"][0].dtype == torch.float32 and state["step"] == 5
    for s in range(5, 8):
        for p, g in zip(params, _grads(init, s)):
            p.grad = g
        opt2.step()
    for a, b in zip(straight, params):
        assert a.dtype == dtype and torch.equal(a, b.detach())


def test_root_dtype_float64_computes_the_roots_in_float64() -> None:
    init = _init(torch.float32, ((12, 20),))
    kw = {"precondition_frequency": 1, "grafting": "none", "betas": (0.0, None), "epsilon": 1e-6, "lr": 1e-2}
    runs = {}
    for root_dtype in ("float32", "float64"):
        params = [t.clone().requires_grad_() for t in init]
        opt = Shampoo(params, root_dtype=root_dtype, **kw)
        for s in range(4):
            params[0].grad = _grads(init, s)[0]
            opt.step()
        runs[root_dtype] = (params[0].detach(), opt.state[params[0]])
    (p32, s32), (p64, s64) = runs["float32"], runs["float64"]
    assert not torch.equal(p32, p64)
    for k in range(2):  # the factors depend on the gradients only: the same in both runs
        F = s32["factors"][k]
        assert torch.equal(F, s64["factors"][k]) and s64["roots"][k].dtype == torch.float32
        exact = torch.from_numpy(_inv_root(F.double().numpy(), 4, 1e-6))
        err64 = (s64["roots"][k].double() - exact).abs().max()
        err32 = (s32["roots"][k].double() - exact).abs().max()
        assert err64 < err32, (k, err64, err32)


def test_per_group_options() -> None:
    """Two groups with other grafting / frequency / blocking equal two optimizers with those options."""
    init = _init(torch.float64, ((16, 12), (8, 8)))
    a = {"grafting": "sgd", "precondition_frequency": 2, "max_preconditioner_dim": 8}
    b = {"grafting": "adagrad", "precondition_frequency": 3, "momentum": 0.9}
    both = _run(lambda ps: Shampoo([{"params": [ps[0]], **a}, {"params": [ps[1]], **b}], lr=1e-2), init)
    alone_a = _run(lambda ps: Shampoo([ps[0]], lr=1e-2, **a), init)[0]
    alone_b = _run(lambda ps: Shampoo([ps[1]], lr=1e-2, **b), init)[1]
    assert torch.equal(both[0], alone_a) and torch.equal(both[1], alone_b)
    opt = Shampoo([torch.zeros(2, 2, requires_grad=True)])
    with pytest.raises(ValueError, match=r"Shampoo\(grafting='adamw'\) is invalid"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "grafting": "adamw"})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": float("nan")}, "lr=nan"),
        ({"betas": (0.9,)}, "betas"),
        ({"betas": (0.9, 1.0)}, r"betas=\(0.9, 1.0\)\) is invalid.*None for a plain sum"),
        ({"betas": (1.0, 0.9)}, "betas"),
        ({"epsilon": 0.0}, "epsilon=0.0"),
        ({"momentum": 1.0}, "momentum=1.0"),
        ({"weight_decay": -0.1}, "weight_decay=-0.1"),
        ({"max_preconditioner_dim": 0}, "max_preconditioner_dim=0"),
        ({"precondition_frequency": 2.5}, "precondition_frequency=2.5"),
        ({"start_preconditioning_step": 0}, "start_preconditioning_step=0"),
        ({"inv_root_override": -1}, "inv_root_override=-1"),
        ({"grafting": "adamw"}, "grafting='adamw'"),
        ({"grafting_beta2": 1.0}, "grafting_beta2=1.0"),
        ({"grafting_epsilon": -1.0}, "grafting_epsilon=-1.0"),
        ({"root_dtype": "bfloat16"}, "root_dtype='bfloat16'"),
        ({"merge_dims": "false"}, "merge_dims='false'"),
        ({"impl": "fused"}, "impl='fused'"),
        ({"use_nesterov": True}, r"use_nesterov=True\) is invalid with momentum=0"),
    ],
)
def test_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=f"Shampoo\\({match}"):
        Shampoo([torch.zeros(2, 2, requires_grad=True)], **kwargs)


def test_rejects_complex_parameters() -> None:
    w = torch.zeros(3, 3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match="shampoo does not support complex parameters"):
        Shampoo([torch.zeros(2, requires_grad=True), w])


def test_refuses_shards_it_cannot_step(tmp_path) -> None:
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = torch.nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]))
        with pytest.raises(ValueError, match=r"Shampoo\(distributed='local'\) got a DTensor.*'fc.weight'"):
            Shampoo([{"params": [w], "param_names": ["fc.weight"]}], distributed="local")
        r = torch.nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Replicate()]))
        with pytest.raises(NotImplementedError, match="supports FSDP2's layout"):
            Shampoo([r])
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# FSDP2 shards and DDP replicas: owner-compute (2 gloo ranks)

_DIST_KW = {"lr": 1e-2, "betas": (0.9, 0.95), "momentum": 0.5, "weight_decay": 0.01, "max_preconditioner_dim": 8,
            "precondition_frequency": 2}


def _dist_train(model, opt, forward, steps: int) -> None:
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad()
        forward(x).pow(2).mean().backward()
        opt.step()


def _full(model) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()
    }


def _dist_rank(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from tests.distributed._harness import UnevenNet, fsdp2_shard

    ref = UnevenNet()
    _dist_train(ref, Shampoo(ref.parameters(), **_DIST_KW, distributed="local"), ref, 5)
    out = {"ref": _full(ref)}
    model = fsdp2_shard(UnevenNet())
    _dist_train(model, Shampoo(model.parameters(), **_DIST_KW), model, 5)
    out["fsdp"] = _full(model)
    model = UnevenNet()
    _dist_train(model, Shampoo(model.parameters(), **_DIST_KW), DistributedDataParallel(model), 5)
    out["ddp"] = _full(model)
    # FSDP2 checkpoint: 3 steps, state_dict (a collective), a fresh optimizer loads it, 2 more == 5
    model = fsdp2_shard(UnevenNet())
    opt = Shampoo(model.parameters(), **_DIST_KW)
    _dist_train(model, opt, model, 3)
    saved = opt.state_dict()
    kinds = sorted({type(v).__name__ for st in saved["state"].values() for v in st.get("factors", [])})
    opt2 = Shampoo(model.parameters(), **_DIST_KW)
    opt2.load_state_dict(saved)
    _dist_train(model, opt2, model, 2)
    out["resumed"], out["factor_types"] = _full(model), kinds
    return out


def test_fsdp2_and_ddp_equal_one_process_and_checkpoints_resume() -> None:
    """On 2 gloo ranks (UnevenNet: uneven rows, an empty shard, a 3-D and a blocked tensor, a diagonal
    bias), every preconditioned tensor is stepped whole by its owner: FSDP2 and DDP equal the
    1-process run bitwise, and an FSDP2 checkpoint (owner state as row-sharded DTensors) resumes exactly."""
    from tests.distributed._harness import run_ranks

    for result in run_ranks(_dist_rank):
        ref = result["ref"]
        for kind in ("fsdp", "ddp", "resumed"):
            for n, a in ref.items():
                assert torch.equal(a, result[kind][n]), f"{kind}: {n} differs from the 1-process run"
        assert result["factor_types"] == ["DTensor"]


def test_registry_entry_and_plain_sum_through_build_optimizer() -> None:
    assert get_optimizer_info("shampoo").cls is Shampoo
    opt = build_optimizer(torch.nn.Linear(4, 3), "shampoo", lr=1e-3, weight_decay=0.1, betas=(0.9, None),
                          grafting="sgd", precondition_frequency=5)
    group = opt.param_groups[-1]
    assert isinstance(opt, Shampoo) and group["betas"] == (0.9, None) and group["precondition_frequency"] == 5
