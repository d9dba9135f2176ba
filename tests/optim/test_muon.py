"""Muon: the Muon side against torch.optim.Muon, the AdamW side against torch.optim.AdamW, in one object.

torch's Newton-Schulz always runs in bfloat16, so the reference comparisons set ``ns_dtype="bfloat16"``;
the float32/float64 iteration is checked against an independent construction: Newton-Schulz acts
on the singular values only, so for ``G = U diag(s) V^T`` the result is ``U diag(f(s)) V^T`` with
``f`` the scalar quintic iterated on ``s / ||s||``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_opt import build_optimizer, get_optimizer_info
from lightning_opt.optim import muon as muon_module
from lightning_opt.optim.muon import (
    POLAR_EXPRESS,
    Muon,
    default_ns_dtype,
    fast_bf16_matmul,
    muon_apply_,
    muon_direction,
    muon_momentum_,
    muon_update_,
    newton_schulz_error,
    newton_schulz_flops,
    ns_schedule,
    orthogonality_error,
    zeropower_via_newtonschulz,
)

SHAPES = {
    "embed.weight": (10, 16),  # AdamW: embedding
    "layers.0.attn.weight": (16, 32),  # Muon, wide
    "layers.0.mlp.weight": (48, 16),  # Muon, tall (transposed NS, lr scaled by sqrt(3))
    "layers.0.mlp.bias": (48,),  # AdamW: 1-D
    "norm.weight": (16,),  # AdamW: 1-D
    "head.weight": (10, 16),  # AdamW: output head
}
MUON_NAMES = ["layers.0.attn.weight", "layers.0.mlp.weight"]
ADAMW_NAMES = [n for n in SHAPES if n not in MUON_NAMES]

CONFIGS = {
    # Keller's setting: "original" lr rule, AdamW side at the default ratio 3e-4 / 0.02
    "original": (
        {"lr": 0.02, "weight_decay": 0.1},
        {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.95, "nesterov": True, "adjust_lr_fn": "original"},
        {"lr": 3e-4, "weight_decay": 0.1, "betas": (0.9, 0.95), "eps": 1e-10},
    ),
    # every other knob moved away from its default
    "moonlight": (
        {
            "lr": 1e-3, "weight_decay": 0.05, "momentum": 0.9, "nesterov": False, "ns_steps": 3,
            "ns_coefficients": (3.0, -3.2, 1.2), "eps": 1e-3, "adjust_lr_fn": "match_rms_adamw",
            "adamw_lr": 5e-3, "adamw_betas": (0.8, 0.99), "adamw_eps": 1e-6,
        },
        {
            "lr": 1e-3, "weight_decay": 0.05, "momentum": 0.9, "nesterov": False, "ns_steps": 3,
            "ns_coefficients": (3.0, -3.2, 1.2), "eps": 1e-3, "adjust_lr_fn": "match_rms_adamw",
        },
        {"lr": 5e-3, "weight_decay": 0.05, "betas": (0.8, 0.99), "eps": 1e-6},
    ),
    # match_rms_adamw: one lr for both sides by default; explicit ratio here
    "ratio": (
        {"lr": 2e-3, "adjust_lr_fn": "match_rms_adamw", "adamw_lr_ratio": 0.5},
        {"lr": 2e-3, "weight_decay": 0.0, "adjust_lr_fn": "match_rms_adamw"},
        {"lr": 1e-3, "weight_decay": 0.0, "betas": (0.9, 0.95), "eps": 1e-10},
    ),
}


def _tensors(dtype: torch.dtype, shapes=SHAPES, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for n, s in shapes.items()}


def _grads(params: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return {n: torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.device, p.dtype) for n, p in params.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_matches_torch_muon_and_adamw(config: str, dtype: torch.dtype) -> None:
    ours_kw, muon_kw, adamw_kw = CONFIGS[config]
    init = _tensors(dtype)
    ours = {n: t.clone().requires_grad_() for n, t in init.items()}
    ref = {n: t.clone().requires_grad_() for n, t in init.items()}
    opt = Muon(list(ours.items()), ns_dtype="bfloat16", **ours_kw)
    ref_muon = torch.optim.Muon([ref[n] for n in MUON_NAMES], **muon_kw)
    ref_adamw = torch.optim.AdamW([ref[n] for n in ADAMW_NAMES], foreach=False, **adamw_kw)
    for step in range(20):
        grads = _grads(init, step)
        for n in SHAPES:
            ours[n].grad = grads[n].clone()
            ref[n].grad = grads[n].clone()
        opt.step()
        ref_muon.step()
        ref_adamw.step()
    for n in SHAPES:
        torch.testing.assert_close(ours[n], ref[n], msg=lambda m, n=n: f"{n}: {m}")
    # the comparison is not vacuous: every parameter moved
    for n in SHAPES:
        assert not torch.allclose(ours[n], init[n])


def _run_pair(ours_kw: dict, muon_kw: dict, adamw_kw: dict, *, grad_scale: float = 1.0, steps: int = 20):
    init = _tensors(torch.float64)
    ours = {n: t.clone().requires_grad_() for n, t in init.items()}
    ref = {n: t.clone().requires_grad_() for n, t in init.items()}
    opt = Muon(list(ours.items()), ns_dtype="bfloat16", **ours_kw)
    ref_muon = torch.optim.Muon([ref[n] for n in MUON_NAMES], **muon_kw)
    ref_adamw = torch.optim.AdamW([ref[n] for n in ADAMW_NAMES], foreach=False, **adamw_kw)
    for step in range(steps):
        grads = _grads(init, step)
        for n in SHAPES:
            ours[n].grad = grads[n] * grad_scale
            ref[n].grad = grads[n] * grad_scale
        opt.step(), ref_muon.step(), ref_adamw.step()
    return ours, ref


BASE = (
    {"lr": 0.02, "weight_decay": 0.1},
    {"lr": 0.02, "weight_decay": 0.1},
    {"lr": 3e-4, "weight_decay": 0.1, "betas": (0.9, 0.95), "eps": 1e-10},
)
# one option at a time: (ours, torch.optim.Muon, torch.optim.AdamW) changes from BASE
SINGLE_OPTIONS = {
    "weight_decay": ({"weight_decay": 0.0}, {"weight_decay": 0.0}, {"weight_decay": 0.0}),
    "momentum": ({"momentum": 0.8}, {"momentum": 0.8}, {}),
    "nesterov": ({"nesterov": False}, {"nesterov": False}, {}),
    "ns_steps": ({"ns_steps": 2}, {"ns_steps": 2}, {}),
    "ns_coefficients": ({"ns_coefficients": (3.0, -3.2, 1.2)}, {"ns_coefficients": (3.0, -3.2, 1.2)}, {}),
    # match_rms_adamw also makes the AdamW side's default lr ratio 1
    "adjust_lr_fn": ({"adjust_lr_fn": "match_rms_adamw"}, {"adjust_lr_fn": "match_rms_adamw"}, {"lr": 0.02}),
    "adamw_lr": ({"adamw_lr": 5e-3}, {}, {"lr": 5e-3}),
    "adamw_lr_ratio": ({"adamw_lr_ratio": 0.5}, {}, {"lr": 0.01}),
    "adamw_betas": ({"adamw_betas": (0.8, 0.99)}, {}, {"betas": (0.8, 0.99)}),
    "adamw_eps": ({"adamw_eps": 0.1}, {}, {"eps": 0.1}),
}


@pytest.mark.parametrize("option", sorted(SINGLE_OPTIONS))
def test_each_option_matches_torch_and_changes_the_result(option: str) -> None:
    delta = SINGLE_OPTIONS[option]
    ours, ref = _run_pair(*({**b, **d} for b, d in zip(BASE, delta)))
    for n in SHAPES:
        torch.testing.assert_close(ours[n], ref[n], msg=lambda m, n=n: f"{n}: {m}")
    base, _ = _run_pair(*BASE, steps=20)
    assert any((ours[n] - base[n]).abs().max() > 1e-6 for n in SHAPES), f"{option} changed nothing"


def test_eps_bounds_the_normalization_like_torch() -> None:
    # eps only acts when ||momentum||_F < eps: gradients of ~1e-6 (norm ~2e-5) with eps=1e-3
    ours, ref = _run_pair({**BASE[0], "eps": 1e-3}, {**BASE[1], "eps": 1e-3}, BASE[2], grad_scale=1e-6)
    base, _ = _run_pair(*BASE, grad_scale=1e-6)
    for n in MUON_NAMES:
        torch.testing.assert_close(ours[n], ref[n])
        assert (ours[n] - base[n]).abs().max() > 1e-4


def _ns_by_svd(G: torch.Tensor, steps: int, coefficients=(3.4445, -4.7750, 2.0315), eps: float = 1e-7) -> torch.Tensor:
    """The Newton-Schulz result computed on the singular values (float64)."""
    a, b, c = coefficients
    U, s, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    x = s / s.square().sum().sqrt().clamp(min=eps)
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return U @ torch.diag(x) @ Vh


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_newton_schulz_against_singular_value_iteration(shape: tuple[int, int]) -> None:
    G = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = _ns_by_svd(G, 5)
    torch.testing.assert_close(zeropower_via_newtonschulz(G, 5, torch.float64), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(zeropower_via_newtonschulz(G, 5, torch.float32).double(), expected, rtol=1e-4, atol=1e-5)
    coeffs = (3.0, -3.2, 1.2)
    torch.testing.assert_close(
        zeropower_via_newtonschulz(G, 3, torch.float64, coefficients=coeffs), _ns_by_svd(G, 3, coeffs), rtol=1e-10, atol=1e-10
    )
    # bf16 is within Keller's tolerance but far from float32's (what ns_dtype buys)
    err_bf16 = (zeropower_via_newtonschulz(G, 5, torch.bfloat16).double() - expected).norm() / expected.norm()
    assert 1e-4 < err_bf16 < 5e-2
    assert G.dtype == torch.float64 and zeropower_via_newtonschulz(G.float(), 5, torch.bfloat16).dtype == torch.bfloat16


@pytest.fixture
def slow_bf16_cpu(monkeypatch: pytest.MonkeyPatch):
    """Pretend the CPU lacks fast bf16 matmuls (the detection is cached: clear it around the test)."""
    monkeypatch.setattr(muon_module, "_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    muon_module.fast_bf16_matmul.cache_clear()
    yield
    muon_module.fast_bf16_matmul.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_default_ns_dtype_is_full_precision_on_cpu(dtype: torch.dtype, slow_bf16_cpu) -> None:
    # one step from zero momentum: p1 = p0 - lr * sqrt(max(1, A/B)) * NS(g) (NS is scale-invariant)
    p0 = torch.randn(48, 16, generator=torch.Generator().manual_seed(0), dtype=dtype)
    g = torch.randn(48, 16, generator=torch.Generator().manual_seed(1), dtype=dtype)
    p = p0.clone().requires_grad_()
    p.grad = g.clone()
    Muon([p], lr=0.02).step()
    expected = p0.double() - 0.02 * math.sqrt(3) * _ns_by_svd(g, 5)
    tol = 1e-12 if dtype is torch.float64 else 1e-6
    torch.testing.assert_close(p.detach().double(), expected, rtol=tol, atol=tol)
    q = p0.clone().requires_grad_()
    q.grad = g.clone()
    Muon([q], lr=0.02, ns_dtype=torch.bfloat16).step()
    assert (q.detach().double() - expected).abs().max() > 1e-4  # bf16 would not pass the check above


@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (40, 2, 2, 2)])
def test_flatten_conv_matches_torch_muon_on_the_matrix_view(shape: tuple[int, ...]) -> None:
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows, cols = shape[0], math.prod(shape[1:])
    ours = w0.clone().requires_grad_()
    ref = w0.reshape(rows, cols).clone().requires_grad_()
    plain = w0.clone().requires_grad_()
    opt = Muon([("conv.weight", ours)], lr=0.02, weight_decay=0.1, flatten_conv=True, ns_dtype="bfloat16")
    ref_opt = torch.optim.Muon([ref], lr=0.02, weight_decay=0.1)
    plain_opt = Muon([("conv.weight", plain)], lr=0.02, weight_decay=0.1)
    ref_adamw = w0.clone().requires_grad_()
    ref_adamw_opt = torch.optim.AdamW([ref_adamw], lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-10)
    assert opt.param_groups[0]["muon_mask"] == [True] and plain_opt.param_groups[0]["muon_mask"] == [False]
    for step in range(20):
        g = torch.randn(shape, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        ours.grad, ref.grad, plain.grad, ref_adamw.grad = g.clone(), g.reshape(rows, cols).clone(), g.clone(), g.clone()
        opt.step(), ref_opt.step(), plain_opt.step(), ref_adamw_opt.step()
    torch.testing.assert_close(ours.detach().reshape(rows, cols), ref.detach())
    torch.testing.assert_close(plain, ref_adamw)  # without flatten_conv a conv weight gets AdamW


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(11, 16)
        self.wpe = nn.Embedding(8, 16)
        self.h = nn.ModuleList([nn.ModuleDict({"c_attn": nn.Linear(16, 48), "ln": nn.LayerNorm(16)})])
        self.lm_head = nn.Linear(16, 11, bias=False)


def _split(opt: Muon) -> dict[str, bool]:
    return {n: m for g in opt.param_groups for n, m in zip(g["param_names"], g["muon_mask"])}


def test_split_by_name_and_shape() -> None:
    opt = build_optimizer(TinyGPT(), "muon", lr=0.02, weight_decay=0.1)
    assert isinstance(opt, Muon)
    assert _split(opt) == {
        "wte.weight": False, "wpe.weight": False, "h.0.c_attn.weight": True, "h.0.c_attn.bias": False,
        "h.0.ln.weight": False, "h.0.ln.bias": False, "lm_head.weight": False,
    }
    custom = build_optimizer(TinyGPT(), "muon", lr=0.02, adamw_patterns=[r"c_attn"])
    split = _split(custom)
    assert split["h.0.c_attn.weight"] is False and split["lm_head.weight"] is True and split["wte.weight"] is True
    # BERT's hidden attention.output.dense is not an output head
    bert = Muon([("encoder.layer.0.attention.output.dense.weight", torch.zeros(4, 4, requires_grad=True))])
    assert bert.param_groups[0]["muon_mask"] == [True]
    # without names only the shape decides
    unnamed = Muon([torch.zeros(4, 4, requires_grad=True), torch.zeros(4, requires_grad=True)])
    assert unnamed.param_groups[0]["muon_mask"] == [True, False]


def test_use_muon_group_key_overrides_the_rules() -> None:
    w, e = torch.zeros(6, 4, requires_grad=True), torch.zeros(6, 4, requires_grad=True)
    opt = Muon([
        {"params": [w], "param_names": ["fc.weight"], "use_muon": False},
        {"params": [e], "param_names": ["embed.weight"], "use_muon": True},
    ])
    assert [g["muon_mask"] for g in opt.param_groups] == [[False], [True]]
    w.grad, e.grad = torch.ones(6, 4), torch.ones(6, 4)
    opt.step()
    assert set(opt.state[w]) == {"step", "exp_avg", "exp_avg_sq"} and set(opt.state[e]) == {"momentum_buffer"}
    with pytest.raises(ValueError, match="use_muon=True.*bias"):
        Muon([{"params": [torch.zeros(3, requires_grad=True)], "param_names": ["bias"], "use_muon": True}])
    with pytest.raises(ValueError, match="flatten_conv=True"):
        Muon([{"params": [torch.zeros(2, 2, 3, 3, requires_grad=True)], "use_muon": True}])


def test_split_is_restored_from_the_checkpoint() -> None:
    init = _tensors(torch.float32)

    def run(opt_kwargs: dict, params: dict, steps: int, state=None):
        opt = Muon(list(params.items()), **opt_kwargs)
        if state is not None:
            opt.load_state_dict(state)
        for s in range(steps):
            for n, g in _grads(init, s if state is None else s + steps).items():
                params[n].grad = g
            opt.step()
        return opt

    straight = {n: t.clone().requires_grad_() for n, t in init.items()}
    run({"weight_decay": 0.01}, straight, 6)
    first = {n: t.clone().requires_grad_() for n, t in init.items()}
    saved = copy.deepcopy(run({"weight_decay": 0.01}, first, 3).state_dict())
    # patterns that would send everything to AdamW: the saved split wins, and the resume is exact
    resumed_opt = run({"weight_decay": 0.01, "adamw_patterns": [r"."]}, first, 3, state=saved)
    assert resumed_opt.param_groups[0]["muon_mask"] == [n in MUON_NAMES for n in SHAPES]
    for n in SHAPES:
        assert torch.equal(first[n], straight[n]), n


def test_bf16_parameters_keep_fp32_state_through_save_and_load() -> None:
    init = _tensors(torch.bfloat16)

    def steps(params, opt, start, count):
        for s in range(start, start + count):
            for n, g in _grads(init, s).items():
                params[n].grad = g
            opt.step()

    straight = {n: t.clone().requires_grad_() for n, t in init.items()}
    opt = Muon(list(straight.items()), weight_decay=0.01)
    steps(straight, opt, 0, 6)
    assert {v.dtype for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)} == {torch.float32}
    first = {n: t.clone().requires_grad_() for n, t in init.items()}
    opt1 = Muon(list(first.items()), weight_decay=0.01)
    steps(first, opt1, 0, 3)
    saved = copy.deepcopy(opt1.state_dict())
    opt2 = Muon(list(first.items()), weight_decay=0.01)
    opt2.load_state_dict(saved)
    assert opt2.state[first["layers.0.attn.weight"]]["momentum_buffer"].dtype == torch.float32
    steps(first, opt2, 3, 3)
    for n in SHAPES:
        assert first[n].dtype == torch.bfloat16 and torch.equal(first[n], straight[n]), n


def test_bf16_step_is_the_float32_step_rounded_once() -> None:
    """With decay on, a bf16 parameter moves to round(p32 (1 - lr wd) - step O): one rounding a step.

    Each step a float32 twin starts from the bf16 weights and the same float32 state; its result
    rounded once to bf16 must equal the bf16 run's, on the Muon side and the AdamW side.
    """
    init = _tensors(torch.bfloat16)
    kw = {"lr": 0.05, "weight_decay": 0.5, "ns_dtype": torch.float32, "adamw_lr_ratio": 1.0}
    low = {n: t.clone().requires_grad_() for n, t in init.items()}
    opt = Muon(list(low.items()), **kw)
    for s in range(4):
        twin = {n: t.detach().float().requires_grad_() for n, t in low.items()}
        opt32 = Muon(list(twin.items()), **kw)
        for n in SHAPES:
            if low[n] in opt.state:
                opt32.state[twin[n]] = copy.deepcopy(opt.state[low[n]])
        for n, g in _grads(init, s).items():
            low[n].grad, twin[n].grad = g, g.float()
        opt.step()
        opt32.step()
        for n in SHAPES:
            assert low[n].dtype == torch.bfloat16
            torch.testing.assert_close(low[n].detach(), twin[n].detach().bfloat16(), rtol=0, atol=0, msg=n)


def test_closure_is_called_once_with_grad_enabled() -> None:
    w = torch.randn(4, 4, requires_grad=True)
    opt = Muon([w])
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [True] and loss is not None


def test_rejects_sharded_dtensor_parameters(tmp_path) -> None:
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]))
        b = nn.Parameter(distribute_tensor(torch.randn(4), mesh, [Shard(0)]))
        Muon([("fc.weight", w)])  # FSDP2's Shard(0): owner-compute (tests/distributed)
        with pytest.raises(ValueError, match=r"Muon\(distributed='local'\) got a DTensor .*'fc.weight'"):
            Muon([("fc.weight", w)], distributed="local")
        r = nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Replicate()]))
        with pytest.raises(NotImplementedError, match="Muon got a DTensor parameter 'fc.weight'.*fully_shard"):
            Muon([("fc.weight", r)])
        Muon([("fc.bias", b)], distributed="local")  # the elementwise AdamW side is shard-safe
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "lr=-1.0"),
        ({"momentum": 1.0}, "momentum=1.0"),
        ({"ns_steps": 0}, "ns_steps=0"),
        ({"ns_coefficients": (1.0, 2.0)}, "ns_coefficients"),
        ({"ns_coefficients": "polar"}, "ns_coefficients='polar'.*polar_express"),
        ({"ns_coefficients": [(3.0, -3.2, 1.2)] * 4}, "4 per-step triples but ns_steps=5"),
        ({"impl": "fused"}, "impl='fused'.*for_loop.*foreach"),
        ({"ns_dtype": "int8"}, "ns_dtype='int8'"),
        ({"adjust_lr_fn": "moonlight"}, "adjust_lr_fn='moonlight'.*match_rms_adamw"),
        ({"adamw_lr": 1e-3, "adamw_lr_ratio": 0.1}, "exclusive"),
        ({"adamw_betas": (0.9, 1.0)}, "adamw_betas"),
        ({"adamw_patterns": "embed"}, "list of regexes"),
        ({"adamw_patterns": ["("]}, r"adamw_patterns=\[\.\.\., '\('\]"),
    ],
)
def test_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Muon([torch.zeros(2, 2, requires_grad=True)], **kwargs)


def test_default_adamw_ratio_follows_adjust_lr_fn() -> None:
    p = [torch.zeros(2, 2, requires_grad=True)]
    assert Muon(p).param_groups[0]["adamw_lr_ratio"] == pytest.approx(0.015)
    assert Muon(p, adjust_lr_fn="match_rms_adamw").param_groups[0]["adamw_lr_ratio"] == 1.0
    assert Muon(p, lr=0.01, adamw_lr=1e-3).param_groups[0]["adamw_lr_ratio"] == pytest.approx(0.1)
    assert Muon(p, ns_dtype="float64").param_groups[0]["ns_dtype"] is torch.float64


def test_registry_entry_and_deepspeed_alias() -> None:
    assert get_optimizer_info("muon").cls is Muon
    assert get_optimizer_info("MuonOptimizer").cls is Muon
    assert get_optimizer_info("Muon").cls is Muon


def test_lightning_automatic_optimization_steps_both_sides() -> None:
    import lightning as L

    from lightning_opt import OptimizerConfig, OptimizerMixin

    class Module(OptimizerMixin, L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.optimizer = OptimizerConfig("muon", lr=0.02, hparams={"ns_dtype": "float32", "adamw_betas": [0.9, 0.95]})
            self.wte = nn.Embedding(11, 16)
            self.fc = nn.Linear(16, 16)
            self.lm_head = nn.Linear(16, 11, bias=False)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.lm_head(torch.tanh(self.fc(self.wte(x)))), y)

    torch.manual_seed(0)
    model = Module()
    before = copy.deepcopy(model.state_dict())
    data = torch.utils.data.TensorDataset(torch.randint(0, 11, (16,)), torch.randint(0, 11, (16,)))
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    (opt,) = trainer.optimizers
    assert isinstance(opt, Muon)
    split = _split(opt)
    assert split["fc.weight"] and not split["wte.weight"] and not split["lm_head.weight"]
    for k, v in model.state_dict().items():
        assert not torch.equal(before[k], v), f"{k} did not move"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_default_ns_dtype_on_cuda_is_bfloat16_like_torch() -> None:
    init = {n: t.cuda() for n, t in _tensors(torch.float32).items()}
    ours = {n: t.clone().requires_grad_() for n, t in init.items()}
    ref = {n: t.clone().requires_grad_() for n, t in init.items()}
    opt = Muon(list(ours.items()), lr=0.02, weight_decay=0.1)  # ns_dtype=None: bf16 on CUDA
    ref_muon = torch.optim.Muon([ref[n] for n in MUON_NAMES], lr=0.02, weight_decay=0.1)
    ref_adamw = torch.optim.AdamW([ref[n] for n in ADAMW_NAMES], lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-10)
    for step in range(20):
        grads = _grads(init, step)
        for n in SHAPES:
            ours[n].grad, ref[n].grad = grads[n].clone(), grads[n].clone()
        opt.step(), ref_muon.step(), ref_adamw.step()
    for n in SHAPES:
        torch.testing.assert_close(ours[n], ref[n], msg=lambda m, n=n: f"{n}: {m}")


# ---- the engine: batched Newton-Schulz, impls, Polar Express, the ns_dtype detection ----

NS_SHAPES = [(33, 65), (65, 33), (7, 3), (16, 16)]


@pytest.mark.parametrize("coefficients", [(3.4445, -4.7750, 2.0315), "polar_express"])
@pytest.mark.parametrize("shape", NS_SHAPES)
def test_batched_newton_schulz_equals_one_matrix_at_a_time(shape: tuple[int, int], coefficients) -> None:
    g = torch.Generator().manual_seed(0)
    # very different scales: each matrix is normalized by its own norm
    scales = torch.tensor([1e-3, 1.0, 10.0, 1e3], dtype=torch.float64).view(4, 1, 1)
    stack = torch.randn((4, *shape), generator=g, dtype=torch.float64) * scales
    for dtype, tol in ((torch.float64, {"rtol": 1e-12, "atol": 1e-12}), (torch.float32, {})):
        batched = zeropower_via_newtonschulz(stack.to(dtype), 5, dtype, coefficients=coefficients)
        assert batched.shape == stack.shape and batched.dtype == dtype
        for k in range(4):
            one = zeropower_via_newtonschulz(stack[k].to(dtype), 5, dtype, coefficients=coefficients)
            torch.testing.assert_close(batched[k], one, **tol)


def test_phases_compose_to_muon_update() -> None:
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(6, 2, 2, generator=g, dtype=torch.float64)  # a conv-like weight, viewed as (6, 4)
    grads = [torch.randn(6, 2, 2, generator=g, dtype=torch.float64) for _ in range(3)]
    hp = {"ns_steps": 5, "ns_coefficients": (3.4445, -4.7750, 2.0315), "eps": 1e-7, "ns_dtype": torch.float64}
    a, buf_a = p0.clone(), torch.zeros_like(p0)
    b, buf_b = p0.clone(), torch.zeros_like(p0)
    for grad in grads:
        kw = {"lr": 0.1, "weight_decay": 0.1, "adjust_lr_fn": "original"}
        muon_update_(a, grad, buf_a, momentum=0.9, nesterov=True, **kw, **hp)
        u = muon_momentum_(grad, buf_b, momentum=0.9, nesterov=True)
        assert u.shape == (6, 4)
        muon_apply_(b, muon_direction(u, **hp), **kw)
    assert torch.equal(a, b) and torch.equal(buf_a, buf_b)


# repeated shapes (batched together), odd shapes, tall and wide, and biases on the AdamW side
IMPL_SHAPES = {
    "blocks.0.attn.weight": (33, 65),
    "blocks.1.attn.weight": (33, 65),
    "blocks.0.mlp.weight": (65, 33),
    "blocks.0.gate.weight": (7, 3),
    "blocks.1.gate.weight": (7, 3),
    "blocks.0.mlp.bias": (65,),
    "blocks.0.gate.bias": (7,),
    "norm.weight": (1,),
}


def _run_impl(impl: str, dtype: torch.dtype, wd: float, steps: int = 20, **kw) -> tuple[dict, Muon]:
    params = {n: t.clone().requires_grad_() for n, t in _tensors(dtype, IMPL_SHAPES).items()}
    opt = Muon(list(params.items()), lr=0.05, weight_decay=wd, adamw_lr_ratio=0.5, impl=impl, **kw)
    for s in range(steps):
        for n, gr in _grads(params, s).items():
            params[n].grad = gr
        opt.step()
    return params, opt


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.dtype == ref.dtype
    if ref.dtype is torch.bfloat16:
        step = torch.finfo(ref.dtype).eps * float(ref.abs().max())
        torch.testing.assert_close(got, ref, rtol=1.6e-2, atol=max(step, 1e-5))
    else:
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["foreach", "auto"])
def test_impl_equals_for_loop_over_20_steps(impl: str, dtype: torch.dtype, wd: float) -> None:
    ref, ref_opt = _run_impl("for_loop", dtype, wd, ns_dtype="float32")
    got, got_opt = _run_impl(impl, dtype, wd, ns_dtype="float32")
    assert ref_opt.param_groups[0]["muon_mask"] == [n.endswith("weight") and n != "norm.weight" for n in IMPL_SHAPES]
    for n in IMPL_SHAPES:
        _close(got[n].detach(), ref[n].detach())
        for key, value in ref_opt.state[ref[n]].items():
            if isinstance(value, torch.Tensor):
                _close(got_opt.state[got[n]][key], value)
            else:
                assert got_opt.state[got[n]][key] == value


def test_impl_foreach_resumes_exactly_from_a_checkpoint() -> None:
    straight, _ = _run_impl("foreach", torch.float32, 0.1, steps=8)
    first, opt = _run_impl("foreach", torch.float32, 0.1, steps=4)
    saved = copy.deepcopy(opt.state_dict())
    resumed = {n: t.detach().clone().requires_grad_() for n, t in first.items()}
    opt2 = Muon(list(resumed.items()), lr=0.05, weight_decay=0.1, adamw_lr_ratio=0.5, impl="foreach")
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["impl"] == "foreach"
    for s in range(4, 8):
        for n, gr in _grads(resumed, s).items():
            resumed[n].grad = gr
        opt2.step()
    for n in IMPL_SHAPES:
        assert torch.equal(resumed[n], straight[n]), n


def test_old_checkpoint_without_impl_loads_as_auto() -> None:
    p = torch.zeros(3, 3, requires_grad=True)
    opt = Muon([p], impl="for_loop")
    state = opt.state_dict()
    for group in state["param_groups"]:
        del group["impl"]
    opt2 = Muon([p])
    opt2.load_state_dict(state)
    assert opt2.param_groups[0]["impl"] == "auto"
    opt3 = Muon([p])
    opt3.__setstate__({"state": {}, "param_groups": [{k: v for k, v in opt.param_groups[0].items() if k != "impl"}]})
    assert opt3.param_groups[0]["impl"] == "auto"


def test_polar_express_schedule_is_the_published_one_with_its_safety_factor() -> None:
    schedule, factor = ns_schedule("polar_express", 10)
    assert factor == 1.01 and len(schedule) == 10
    a, b, c = schedule[0]
    assert a * 1.01 == pytest.approx(8.28721201814563) and b * 1.01**3 == pytest.approx(-23.595886519098837)
    assert c * 1.01**5 == pytest.approx(17.300387312530933)
    # past the published list the last (unscaled) polynomial repeats
    assert schedule[7:] == ((1.875, -1.25, 0.375),) * 3 and schedule[:7] == POLAR_EXPRESS[:7]
    assert ns_schedule((1.0, 2.0, 3.0), 3) == (((1.0, 2.0, 3.0),) * 3, 1.0)
    per_step = [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]
    assert ns_schedule(per_step, 2) == (tuple(per_step), 1.0)
    with pytest.raises(ValueError, match="per-step triples but ns_steps=3"):
        ns_schedule(per_step, 3)


def test_polar_express_matches_its_singular_value_iteration() -> None:
    G = torch.randn(24, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    U, s, Vh = torch.linalg.svd(G, full_matrices=False)
    x = s / (s.square().sum().sqrt() * 1.01)
    for a, b, c in ns_schedule("polar_express", 5)[0]:
        x = a * x + b * x**3 + c * x**5
    expected = U @ torch.diag(x) @ Vh
    got = zeropower_via_newtonschulz(G, 5, torch.float64, coefficients="polar_express")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # a per-step list runs each triple once: Keller's triple listed 5 times is the default
    keller = zeropower_via_newtonschulz(G, 5, torch.float64)
    listed = zeropower_via_newtonschulz(G, 5, torch.float64, coefficients=[(3.4445, -4.7750, 2.0315)] * 5)
    assert torch.equal(keller, listed)


def test_polar_express_is_closer_to_orthogonal_at_the_same_flops() -> None:
    # the number the benchmark prints next to the time: max |sigma - 1| on a gradient-like matrix
    keller = newton_schulz_error((64, 256), steps=5)
    polar = newton_schulz_error((64, 256), steps=5, coefficients="polar_express")
    assert 0.25 < keller < 0.35  # Keller's quintic plateaus near 0.3 by design
    assert polar < 0.5 * keller
    assert newton_schulz_error((64, 256), steps=6, coefficients="polar_express") < 0.01
    # one cost per step whatever the coefficients: 4 r^2 k + 2 r^3 multiply-add flops
    assert newton_schulz_flops(64, 256, 5) == newton_schulz_flops(256, 64, 5) == 5 * (4 * 64 * 64 * 256 + 2 * 64**3)
    assert orthogonality_error(torch.eye(5, 7)) == 0.0


def test_muon_takes_polar_express_and_per_step_coefficients() -> None:
    base, _ = _run_impl("foreach", torch.float64, 0.0, steps=3)
    polar, opt = _run_impl("foreach", torch.float64, 0.0, steps=3, ns_coefficients="polar_express")
    assert opt.param_groups[0]["ns_coefficients"] == "polar_express"
    assert any((polar[n] - base[n]).abs().max() > 1e-4 for n in IMPL_SHAPES)
    listed, opt = _run_impl("foreach", torch.float64, 0.0, steps=3, ns_coefficients=[[3.4445, -4.7750, 2.0315]] * 5)
    assert opt.param_groups[0]["ns_coefficients"] == ((3.4445, -4.7750, 2.0315),) * 5
    for n in IMPL_SHAPES:
        assert torch.equal(listed[n], base[n]), n


@pytest.mark.parametrize(
    ("flags", "capability", "fast"),
    [
        ({"avx2", "fma"}, "AVX2", False),
        ({"avx512f", "avx512_bf16", "amx_bf16"}, "AVX512", True),
        ({"avx512f", "amx_bf16"}, "AVX2", False),  # ATEN_CPU_CAPABILITY=avx2 forces the slow kernels
        ({"fp", "asimd", "bf16"}, "DEFAULT", False),
        ({"fp", "asimd", "bf16"}, "SVE256", True),
        (set(), "AVX512", False),
    ],
)
def test_ns_dtype_follows_detected_bf16_matmul_speed(monkeypatch, flags, capability, fast) -> None:
    monkeypatch.setattr(muon_module, "_cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    fast_bf16_matmul.cache_clear()
    try:
        assert fast_bf16_matmul("cpu") is fast
        assert fast_bf16_matmul("cuda") is True and fast_bf16_matmul("meta") is False
        p = torch.zeros(2, 2)
        assert default_ns_dtype(p) is (torch.bfloat16 if fast else torch.float32)
        assert default_ns_dtype(p.bfloat16()) is (torch.bfloat16 if fast else torch.float32)
        assert default_ns_dtype(p.double()) is torch.float64  # asked-for precision off CUDA
    finally:
        fast_bf16_matmul.cache_clear()


def test_detection_on_this_machine_reads_the_cpu_flags() -> None:
    fast_bf16_matmul.cache_clear()
    flags = muon_module._cpu_flags()
    fast = bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    if not fast:  # an AVX2-only CPU: bf16 matmul is ~100x slower there, float32 it is
        assert default_ns_dtype(torch.zeros(2, 2)) is torch.float32
    capable = not torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "DEFAULT", "NO AVX"))
    assert fast_bf16_matmul("cpu") is (fast and capable)
