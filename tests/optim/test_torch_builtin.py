"""Torch-backed entries: ``impl`` picks torch's for-loop, foreach or fused path; "auto" takes fused where it is correct."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

from lightning_opt.optim import accepted_hparams, build_optimizer, get_optimizer_info

FUSED = ["adamw", "adam", "sgd", "adagrad"]
UNFUSED = ["rmsprop", "radam", "nadam"]  # adafactor is ours: tests/optim/test_adafactor.py
NAMES = FUSED + ["sgd_nesterov"] + UNFUSED
SHAPES = [(1,), (5,), (1025,), (7, 3), (33, 65)]
# options that exercise each class's state (momentum for SGD: its fused kernel keeps a buffer)
HPARAMS = {"sgd": {"momentum": 0.9}, "adam": {"amsgrad": True}, "rmsprop": {"momentum": 0.5, "centered": True}}


def _params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in SHAPES]


def _run(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int = 20, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 0.1).to(p.dtype)
        opt.step()
    return [p.detach().clone() for p in params]


def _ours(name: str, params: list[torch.Tensor], wd: float, **kw) -> torch.optim.Optimizer:
    return build_optimizer(params, name, lr=1e-2, weight_decay=wd, **HPARAMS.get(name, {}), **kw)


def _torch(name: str, params: list[torch.Tensor], wd: float, **kw) -> torch.optim.Optimizer:
    info = get_optimizer_info(name)
    # the registry entry's own defaults (sgd_nesterov: momentum 0.9) and fixed arguments, as build_optimizer passes
    hp = {**info.defaults, **info.fixed, **HPARAMS.get(name, {})}
    return info.cls.torch_class(params, lr=1e-2, weight_decay=wd, **hp, **kw)


@pytest.mark.parametrize("name", FUSED)
def test_auto_picks_torch_fused_on_cpu(name: str) -> None:
    opt = _ours(name, _params(torch.float32), 0.0)
    info = get_optimizer_info(name)
    assert type(opt) is info.cls.torch_class
    assert all(g["fused"] is True for g in opt.param_groups)
    assert info.cls.impls == ("for_loop", "foreach", "fused")


@pytest.mark.parametrize("name", UNFUSED)
def test_auto_keeps_torch_default_without_a_fused_kernel(name: str) -> None:
    opt = _ours(name, _params(torch.float32), 0.0)
    assert opt.defaults["foreach"] is None and "fused" not in opt.defaults  # torch's own choice: for-loop on the CPU
    assert get_optimizer_info(name).cls.impls == ("for_loop", "foreach")


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("name", NAMES)
def test_every_impl_matches_torch_for_loop_fp32(name: str, wd: float) -> None:
    ref = _run(_torch(name, ps := _params(torch.float32), wd, foreach=False), ps)
    for impl in ("auto", *get_optimizer_info(name).cls.impls):
        out = _run(_ours(name, ps := _params(torch.float32), wd, impl=impl), ps)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, msg=lambda m: f"{name} impl={impl}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_every_impl_in_bf16(name: str) -> None:
    """Every impl is as accurate as torch's bf16 for-loop, measured against a float64 run.

    Torch's paths do not agree with each other in bf16 within bf16 tolerances after 20 steps: the
    fused kernels compute in float32 and round once per step, the for-loop and foreach round every
    op to bf16 (in different orders). So each is held to the for-loop's own error.
    """
    loop = _run(_torch(name, ps := _params(torch.bfloat16), 0.1, foreach=False), ps)
    exact = _run(_torch(name, ps := [p.double().detach().requires_grad_() for p in _params(torch.bfloat16)], 0.1, foreach=False), ps)
    for impl in ("auto", *get_optimizer_info(name).cls.impls):
        if impl == "fused" and name.startswith("sgd"):
            with pytest.raises(ValueError, match=r"SGD\(impl='fused'\): torch's fused SGD kernel does not update torch.bfloat16"):
                _ours(name, _params(torch.bfloat16), 0.1, impl=impl)
            continue
        out = _run(_ours(name, ps := _params(torch.bfloat16), 0.1, impl=impl), ps)
        for a, b, x in zip(out, loop, exact):
            assert a.dtype == torch.bfloat16
            err, loop_err = (a.double() - x).abs().max(), (b.double() - x).abs().max()
            assert err <= 2 * loop_err + 2**-7, f"{name} impl={impl}: error {err:.3g} vs for-loop {loop_err:.3g}"


def test_cpu_sgd_half_precision_keeps_torch_default() -> None:
    """torch 2.13's fused CPU SGD leaves bf16/fp16 parameters (nearly) unmoved, so auto does not take it."""
    for dtype in (torch.bfloat16, torch.float16):
        ps = _params(dtype)
        opt = _ours("sgd", ps, 0.0)
        assert opt.param_groups[0]["fused"] is None
        ref = _run(_torch("sgd", qs := _params(dtype), 0.0), qs)
        assert all(torch.equal(a, b) for a, b in zip(_run(opt, ps), ref))


def test_auto_per_group_and_fallbacks() -> None:
    real = nn.Parameter(torch.randn(4))
    cplx = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = build_optimizer([{"params": [real]}, {"params": [cplx]}], "adamw", lr=1e-2)
    assert [g["fused"] for g in opt.param_groups] == [True, None]
    for p in (real, cplx):
        p.grad = torch.ones_like(p)
    opt.step()  # the complex group takes torch's default path
    # differentiable=True has no fused kernel: torch's default
    assert build_optimizer([real], "adam", lr=1e-2, differentiable=True).param_groups[0]["fused"] is None
    # a complex group added later falls back at its first step instead of failing
    opt = build_optimizer([real], "adam", lr=1e-2)
    late = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt.add_param_group({"params": [late]})
    late.grad = torch.ones_like(late)
    opt.step()
    assert [g["fused"] for g in opt.param_groups] == [True, None]


@pytest.mark.parametrize("name", ["sgd", "adagrad"])
def test_sparse_gradients_fall_back_to_torch_default(name: str) -> None:
    def run(make) -> torch.Tensor:
        torch.manual_seed(0)
        emb = nn.Embedding(10, 3, sparse=True)
        opt = make(emb.parameters())
        for i in range(3):
            opt.zero_grad()
            emb(torch.tensor([i, i + 1])).pow(2).sum().backward()
            opt.step()
        return emb.weight.detach()

    ours = run(lambda ps: build_optimizer(list(ps), name, lr=0.1))
    ref = run(lambda ps: get_optimizer_info(name).cls.torch_class(ps, lr=0.1))
    assert torch.equal(ours, ref)


@pytest.mark.parametrize(
    ("name", "kw", "message"),
    [
        ("adamw", {"impl": "triton"}, r"AdamW\(impl='triton'\) is invalid; expected one of \('auto', 'for_loop', 'foreach', 'fused'\); torch's AdamW has no Triton kernel"),
        ("rmsprop", {"impl": "fused"}, r"RMSprop\(impl='fused'\) is invalid; expected one of \('auto', 'for_loop', 'foreach'\) \(and no fused one\)"),
        ("sgd", {"impl": "fast"}, r"SGD\(impl='fast'\) is invalid"),
        ("adam", {"impl": "for_loop", "foreach": True}, r"Adam\(impl='for_loop'\) and foreach=True both choose the implementation"),
        ("adagrad", {"impl": "fused", "fused": False}, r"Adagrad\(impl='fused'\) and fused=False both choose"),
        ("adamw_torch_fused", {"impl": "foreach"}, r"AdamW\(impl='foreach'\) and fused=True both choose"),
    ],
)
def test_bad_impl_is_refused_at_construction(name: str, kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_optimizer(nn.Linear(2, 2), name, lr=1e-3, **kw)


def test_torch_foreach_and_fused_are_honoured() -> None:
    lin = nn.Linear(3, 3)
    opt = build_optimizer(lin, "adamw", lr=1e-3, foreach=True)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    opt = build_optimizer(lin, "adamw", lr=1e-3, fused=False)
    assert opt.defaults["fused"] is False and opt.param_groups[0]["fused"] is False
    opt = build_optimizer(lin, "adamw_torch_fused", lr=1e-3)  # torch's fused=True, AMP scaling in the kernel as torch
    assert opt.defaults["fused"] is True and opt._step_supports_amp_scaling
    # Adagrad takes foreach positionally
    opt = get_optimizer_info("adagrad").cls(lin.parameters(), 0.1, 0.0, 0.0, 0.0, 1e-10, True)
    assert opt.defaults["foreach"] is True and opt.param_groups[0].get("fused") is None
    for name, impl, key, value in [("sgd", "for_loop", "foreach", False), ("sgd", "foreach", "foreach", True), ("adam", "fused", "fused", True)]:
        assert build_optimizer(lin, name, lr=1e-3, impl=impl).defaults[key] is value


def test_signature_is_torch_plus_impl() -> None:
    for name in NAMES:
        info = get_optimizer_info(name)
        sig = inspect.signature(info.cls)
        torch_params = list(inspect.signature(info.cls.torch_class).parameters)
        assert list(sig.parameters) == [*torch_params, "impl"]
        assert sig.parameters["impl"].default == "auto"
        assert "impl" in accepted_hparams(info)
    with pytest.raises(TypeError, match="takes no 'eps'"):
        build_optimizer(nn.Linear(2, 2), "sgd", lr=0.1, eps=1e-8)


def test_grad_scaler_unscales_before_an_auto_fused_step() -> None:
    """Under GradScaler an auto-fused step sees unscaled gradients, as torch's default path (clipping works)."""

    def run(make) -> list[torch.Tensor]:
        torch.manual_seed(0)
        lin = nn.Linear(4, 2)
        opt = make(lin.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for i in range(3):
            opt.zero_grad()
            scaler.scale(lin(torch.full((2, 4), float(i + 1))).pow(2).mean()).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(lin.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
        return [p.detach() for p in lin.parameters()]

    ours = run(lambda ps: build_optimizer(list(ps), "adamw", lr=1e-2))
    ref = run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0, foreach=False))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_state_dict_round_trip() -> None:
    """4 steps + save + load into a fresh optimizer + 4 steps == 8 steps straight (fused flag kept)."""
    opt = _ours("adamw", ps := _params(torch.float32), 0.1)
    _run(opt, ps, steps=4)
    straight = _run(opt, ps, steps=4, seed=2)
    opt = _ours("adamw", first := _params(torch.float32), 0.1)
    _run(opt, first, steps=4)
    saved = copy.deepcopy(opt.state_dict())
    resumed = [p.detach().clone().requires_grad_() for p in first]
    opt2 = _ours("adamw", resumed, 0.1)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["fused"] is True
    for a, b in zip(_run(opt2, resumed, steps=4, seed=2), straight):
        assert torch.equal(a, b)
