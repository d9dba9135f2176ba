"""SOAP against pytorch_optimizer.SOAP: same weights, same gradients, 20 steps, float64 and float32.

The update does not depend on the sign of the eigenvectors (a sign flip of a basis column flips the
matching rows of ``G'`` and ``m'`` and cancels in the rotation back; ``v'`` is squared), and both
implementations run ``eigh`` on the same matrix, so the comparison is exact up to rounding. The
reference runs its refresh QR in float32 even for float64 parameters; its effect (~1e-8 here) is
inside float64's default tolerance, while each trajectory is ~2e-2 away from plain Adam's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from pytorch_optimizer import SOAP as RefSOAP

from lightning_opt import build_optimizer, get_optimizer_info
from lightning_opt.optim.soap import SOAP, soap_merge_shape, soap_project, soap_project_stacked

SHAPES = [(16, 16), (12, 20), (20, 12), (7,), (8, 4, 3, 3)]

# name -> (our kwargs, the reference's kwargs); every option moved away from its default somewhere
CONFIGS = {
    "defaults": ({}, {}),
    "refresh_every_3": ({"precondition_frequency": 3}, {"precondition_frequency": 3}),
    "betas": ({"betas": (0.9, 0.99), "precondition_frequency": 4}, {"betas": (0.9, 0.99), "precondition_frequency": 4}),
    "eps": ({"eps": 1e-2}, {"eps": 1e-2}),
    "weight_decay": ({"weight_decay": 0.5}, {"weight_decay": 0.5}),
    "shampoo_beta": (
        {"shampoo_beta": 0.5, "precondition_frequency": 3},
        {"shampoo_beta": 0.5, "precondition_frequency": 3},
    ),
    # 20 > 16: the second dim of (12, 20) and the first of (20, 12) stay unrotated
    "max_precond_dim": (
        {"max_precond_dim": 16, "precondition_frequency": 3},
        {"max_precondition_dim": 16, "precondition_frequency": 3},
    ),
    # (8, 4, 3, 3) -> (32, 9) and (12, 20) stays (12, 20) with a limit of 40; the 1-D parameter is
    # left out because the reference's merge_small_dims turns shape (7,) into (1,) and fails
    "merge_dims": (
        {"merge_dims": True, "max_precond_dim": 40, "precondition_frequency": 3},
        {"merge_dims": True, "max_precondition_dim": 40, "precondition_frequency": 3},
    ),
    # a 1-D preconditioner g g^T gains rank 1 per step; refreshing it while it is singular (rank 4 of 7
    # at update 3) makes QR's basis of the null space rounding noise, and the reference's float32 QR
    # picks another one than our float64 QR; at update 10 it has full rank
    "precondition_1d": ({"precondition_1d": True}, {"precondition_1d": True}),
    # the reference divides by RMS + eps, the SOAP repo (and we) by RMS + 1e-30: eps=0 makes them equal
    "normalize_grads": (
        {"normalize_grads": True, "eps": 0.0, "precondition_frequency": 3},
        {"normalize_gradient": True, "eps": 0.0, "precondition_frequency": 3},
    ),
    "no_bias_correction": ({"correct_bias": False}, {"correct_bias": False}),
}


def _init(dtype: torch.dtype, shapes=SHAPES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def _grads(init: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in init]


def _run(make, init: list[torch.Tensor], steps: int = 20) -> list[torch.Tensor]:
    params = [t.clone().requires_grad_() for t in init]
    opt = make(params)
    for s in range(steps):
        for p, g in zip(params, _grads(init, s)):
            p.grad = g
        opt.step()
    return [p.detach() for p in params]


_BASE = {"lr": 3e-3, "weight_decay": 0.01}
_CACHE: dict[tuple, list[torch.Tensor]] = {}


def _ours(dtype: torch.dtype, shapes: tuple, **kwargs) -> list[torch.Tensor]:
    key = (dtype, shapes, tuple(sorted(kwargs.items())))
    if key not in _CACHE:
        _CACHE[key] = _run(lambda ps: SOAP(ps, **{**_BASE, **kwargs}), _init(dtype, shapes))
    return _CACHE[key]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_matches_pytorch_optimizer_soap(config: str, dtype: torch.dtype) -> None:
    ours_kw, ref_kw = CONFIGS[config]
    shapes = tuple(s for s in SHAPES if len(s) > 1) if config == "merge_dims" else tuple(SHAPES)
    ours = _ours(dtype, shapes, **ours_kw)
    ref = _run(lambda ps: RefSOAP(ps, **{**_BASE, **ref_kw}), _init(dtype, shapes))
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, msg=lambda m, s=tuple(o.shape): f"{s}: {m}")
    if dtype is torch.float32:
        return
    # a wrong algorithm would not pass: the trajectory is far from plain Adam's and from our run
    # without the option (with the same refresh frequency, so the option itself matters)
    adam = _run(lambda ps: _LateAdam(ps, lr=3e-3), _init(dtype, shapes))
    assert any((o - a).abs().max() > 1e-3 for o, a in zip(ours, adam))
    if config != "defaults":
        freq = {k: v for k, v in ours_kw.items() if k == "precondition_frequency"}
        without = _ours(dtype, shapes, **freq) if config != "refresh_every_3" else _ours(dtype, shapes)
        assert any((o - w).abs().max() > 1e-5 for o, w in zip(ours, without)), f"{config} changed nothing"


class _LateAdam(torch.optim.Adam):
    """Adam that, like SOAP, skips its first step (so the comparison is about the basis only)."""

    def step(self, closure=None):
        self._seen = getattr(self, "_seen", 0) + 1
        return super().step(closure) if self._seen > 1 else None


def test_first_step_only_builds_the_preconditioners() -> None:
    p = torch.randn(6, 4, requires_grad=True)
    before = p.detach().clone()
    opt = SOAP([p], weight_decay=0.1)
    p.grad = torch.randn(6, 4)
    opt.step()
    assert torch.equal(p, before)
    state = opt.state[p]
    assert state["step"] == 0 and [L.shape for L in state["GG"]] == [(6, 6), (4, 4)]
    p.grad = torch.randn(6, 4)
    opt.step()
    assert not torch.equal(p, before) and state["step"] == 1


def test_merge_shape_and_projection() -> None:
    assert soap_merge_shape((8, 4, 3, 3), 40) == [32, 9]
    assert soap_merge_shape((2000, 3), 1000) == [2000, 3]
    assert soap_merge_shape((3, 2000), 1000) == [3, 2000]
    assert soap_merge_shape((4, 2, 3, 3), 10000) == [72]
    g = torch.Generator().manual_seed(0)
    G = torch.randn(5, 3, generator=g, dtype=torch.float64)
    QL = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))[0]
    QR = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0]
    torch.testing.assert_close(soap_project(G, [QL, QR]), QL.T @ G @ QR)
    torch.testing.assert_close(soap_project(G, [None, QR]), G @ QR)
    torch.testing.assert_close(soap_project(soap_project(G, [QL, QR]), [QL, QR], back=True), G)
    # a conv kernel merged into one dim gets one preconditioner
    w = torch.randn(4, 2, 3, 3, requires_grad=True)
    opt = SOAP([w], merge_dims=True)
    w.grad = torch.randn(4, 2, 3, 3)
    opt.step()
    assert [L.shape for L in opt.state[w]["GG"]] == [(72, 72)]


@pytest.mark.parametrize("impl", ["for_loop", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_resume_is_exact_across_a_refresh(dtype: torch.dtype, impl: str) -> None:
    init = _init(dtype, [*SHAPES, (16, 16), (7,)])  # repeated shapes: foreach batches them

    def steps(params, opt, start, count):
        for s in range(start, start + count):
            for p, g in zip(params, _grads(init, s)):
                p.grad = g
            opt.step()

    kw = {"precondition_frequency": 3, "precondition_1d": True, "impl": impl}
    straight = [t.clone().requires_grad_() for t in init]
    opt = SOAP(straight, **kw)
    steps(straight, opt, 0, 8)
    first = [t.clone().requires_grad_() for t in init]
    opt1 = SOAP(first, **kw)
    steps(first, opt1, 0, 4)  # 3 updates after the init step: the bases were refreshed once
    saved = copy.deepcopy(opt1.state_dict())
    assert saved["param_groups"][0]["impl"] == impl
    opt2 = SOAP(first, **kw)
    opt2.load_state_dict(saved)
    state = opt2.state[first[0]]
    assert state["exp_avg"].dtype == torch.float32 and state["Q"][0].dtype == torch.float32
    steps(first, opt2, 4, 4)
    for a, b in zip(straight, first):
        assert a.dtype == dtype and torch.equal(a, b)


def test_closure_is_called_once_with_grad_enabled() -> None:
    w = torch.randn(4, 4, requires_grad=True)
    opt = SOAP([w])
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        loss = (w**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure) is not None and calls == [True]


def test_refuses_dtensor_layouts_it_cannot_step(tmp_path) -> None:
    """FSDP2's Shard(0) is taken (tests/distributed/test_matrix_owner_compute.py steps it); other
    placements and distributed='local' on a shard are refused at construction."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = torch.nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]))
        SOAP([{"params": [w], "param_names": ["fc.weight"]}])
        with pytest.raises(ValueError, match=r"SOAP\(distributed='local'\) got a DTensor .*'fc.weight'"):
            SOAP([{"params": [w], "param_names": ["fc.weight"]}], distributed="local")
        r = torch.nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Replicate()]))
        with pytest.raises(NotImplementedError, match="SOAP got a DTensor parameter 'fc.weight'.*fully_shard"):
            SOAP([{"params": [r], "param_names": ["fc.weight"]}])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": float("nan")}, "lr=nan"),
        ({"betas": (0.9,)}, "betas"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"shampoo_beta": 1.5}, "shampoo_beta=1.5"),
        ({"eps": -1.0}, "eps=-1.0"),
        ({"weight_decay": -0.1}, "weight_decay=-0.1"),
        ({"precondition_frequency": 0}, "precondition_frequency=0"),
        ({"max_precond_dim": 2.5}, "max_precond_dim=2.5"),
    ],
)
def test_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=f"SOAP\\({match}"):
        SOAP([torch.zeros(2, 2, requires_grad=True)], **kwargs)


def test_registry_entry() -> None:
    assert get_optimizer_info("soap").cls is SOAP
    opt = build_optimizer(torch.nn.Linear(4, 3), "soap", lr=1e-3, weight_decay=0.1, precondition_frequency=5)
    assert isinstance(opt, SOAP) and opt.param_groups[0]["precondition_frequency"] == 5


def test_phases_compose_to_the_step() -> None:
    """soap_direction, soap_apply_ and soap_precondition_ called one by one equal SOAP's steps."""
    from lightning_opt.optim.soap import soap_apply_, soap_direction, soap_precondition_

    init = _init(torch.float64, [(12, 20), (8, 4, 3, 3)])
    ref = _run(lambda ps: SOAP(ps, precondition_frequency=3, weight_decay=0.1), init, steps=8)
    params = [t.clone().requires_grad_() for t in init]
    opt = SOAP(params, precondition_frequency=3, weight_decay=0.1)
    group = opt.param_groups[0]
    for s in range(8):
        grads = _grads(init, s)
        for p, g in zip(params, grads):
            state = opt.state[p]
            if "Q" not in state:
                SOAP._init_state(p, g, group, state)
                continue
            with torch.no_grad():
                update = soap_direction(g, state, beta1=0.95, beta2=0.95, eps=1e-8, normalize_grads=False)
                soap_apply_(
                    p, update, step=state["step"], lr=3e-3, beta1=0.95, beta2=0.95, weight_decay=0.1, correct_bias=True
                )
                soap_precondition_(g, state, shampoo_beta=0.95, precondition_frequency=3)
    for a, b in zip(params, ref):
        assert torch.equal(a.detach(), b)


# repeated shapes (batched by foreach), odd ones, 1-D ones, a conv kernel twice
IMPL_SHAPES = [(16, 16), (16, 16), (16, 16), (12, 20), (7, 3), (7, 3), (33, 65), (5,), (5,), (1,), (1025,)]
IMPL_SHAPES += [(8, 4, 3, 3), (8, 4, 3, 3)]
IMPL_CONFIGS = {
    "defaults": {},
    "precondition_1d": {"precondition_1d": True},
    "normalize_grads": {"normalize_grads": True},
    "merge_dims": {"merge_dims": True, "max_precond_dim": 40},
    "max_precond_dim": {"max_precond_dim": 16},
    "no_bias_correction": {"correct_bias": False},
}


def _run_impl(impl: str, dtype: torch.dtype, **kwargs) -> tuple[list[torch.Tensor], SOAP]:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in IMPL_SHAPES]
    # refreshes every 3 updates, so the bases change (and exp_avg is rotated along) several times
    opt = SOAP(params, impl=impl, precondition_frequency=3, **kwargs)
    for s in range(20):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
            if i == 1 and s % 3 == 1:
                p.grad = None  # this one falls behind: its group mates have other step counts
        opt.step()
    return [p.detach() for p in params], opt


def _close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.dtype == ref.dtype, what
    if ref.dtype is torch.bfloat16:
        step = torch.finfo(ref.dtype).eps * float(ref.abs().max())
        torch.testing.assert_close(got, ref, rtol=1.6e-2, atol=max(step, 1e-5), msg=lambda m: f"{what}: {m}")
    else:
        torch.testing.assert_close(got, ref, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("config", sorted(IMPL_CONFIGS))
def test_foreach_equals_for_loop(config: str, dtype: torch.dtype, wd: float) -> None:
    ref, ref_opt = _run_impl("for_loop", dtype, weight_decay=wd, **IMPL_CONFIGS[config])
    got, got_opt = _run_impl("foreach", dtype, weight_decay=wd, **IMPL_CONFIGS[config])
    for i, (a, b) in enumerate(zip(ref, got)):
        _close(b, a, f"param {i} {tuple(a.shape)}")
        sa = ref_opt.state[ref_opt.param_groups[0]["params"][i]]
        sb = got_opt.state[got_opt.param_groups[0]["params"][i]]
        assert sa["step"] == sb["step"]
        for key in ("exp_avg", "exp_avg_sq"):
            _close(sb[key], sa[key], f"param {i} {key}")
        for key in ("Q", "GG"):
            # the preconditioner phase is per tensor in both impls: the bases are bitwise equal
            assert all(
                (x is None and y is None) or torch.equal(x, y) for x, y in zip(sa[key], sb[key])
            ), f"param {i} {key}"


def test_stacked_projection_equals_one_at_a_time() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    Q = [torch.linalg.qr(torch.randn(3, n, n, generator=g, dtype=torch.float64))[0] for n in (4, 5, 6)]
    Q[1] = None  # an unrotated dim in the middle
    for back in (False, True):
        stacked = soap_project_stacked(x, Q, back=back)
        for j in range(3):
            one = soap_project(x[j], [None if q is None else q[j] for q in Q], back=back)
            torch.testing.assert_close(stacked[j], one)


def test_impl_is_checked_at_construction_and_backfilled() -> None:
    w = torch.zeros(2, 2, requires_grad=True)
    assert SOAP.impls == ("for_loop", "foreach")
    expected = r"SOAP\(impl='fused'\) is invalid; expected one of \('auto', 'for_loop', 'foreach'\)"
    with pytest.raises(ValueError, match=expected):
        SOAP([w], impl="fused")
    opt = SOAP([w])
    with pytest.raises(ValueError, match=r"SOAP\(impl='vectorized'\)"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "impl": "vectorized"})
    assert len(opt.param_groups) == 1
    # a checkpoint from before the option loads with impl="auto"
    saved = opt.state_dict()
    del saved["param_groups"][0]["impl"]
    fresh = SOAP([w], impl="foreach")
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["impl"] == "auto"
