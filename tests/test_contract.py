"""The contract every registered optimizer must pass (one suite over ``available_optimizers()``).

Per-name exceptions live in ``tests/contract_overrides.py`` (``OVERRIDES[name]``), with keys:
- ``lr``: learning rate for the convergence test (default: the entry's ``default_lr``).
- ``hparams``: extra hyperparameters passed to ``build_optimizer`` in every test.
- ``steps``: optimizer steps of the convergence test (default 300).
- ``loss_threshold``: final/initial loss ratio the convergence test must reach (default 0.3).
- ``bf16``: ``False`` to skip the bfloat16 dtype check, with a ``why``.
- ``refuses``: ``{(impl, dtype name): regex}``: that impl must refuse parameters of that dtype with
  an error matching the regex (instead of stepping them) in the dtype test.
- ``why``: the reason for the override (required, shown in skip messages).

Every test runs once per implementation a name offers (its class's or factory's ``impls``:
``for_loop``, ``foreach``, ``fused``, ``triton`` under the interpreter) and once with the default
(``impl`` not passed, i.e. ``"auto"``); names without ``impls`` run once.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

from lightning_opt import available_optimizers, build_optimizer, get_optimizer_info
from tests.contract_overrides import OVERRIDES

NAMES = available_optimizers()


def _impls(name: str) -> tuple[str | None, ...]:
    return (None, *getattr(get_optimizer_info(name).cls, "impls", ()))


CASES = [pytest.param(name, impl, id=f"{name}-{impl or 'default'}") for name in NAMES for impl in _impls(name)]


def _spec(name: str) -> dict:
    return {"steps": 300, "loss_threshold": 0.3, "bf16": True, "hparams": {}, **OVERRIDES.get(name, {})}


class Net(nn.Module):
    """A small MLP: 2-D hidden weights (for matrix optimizers), biases, a 1-D output head."""

    def __init__(self, d_in: int = 8, d_hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.head = nn.Linear(d_hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _data(n: int = 128, d_in: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    w = torch.randn(d_in, 1, generator=g)
    return x, torch.tanh(x @ w) + 0.5 * torch.sin(2 * x[:, :1])


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    calls: list[bool] = []

    def closure() -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x).float(), y)
        loss.backward()
        return loss

    # Lightning's automatic optimization hands step() the closure: call it once, with grad enabled
    with torch.no_grad():
        loss = opt.step(closure)
    assert calls == [True], f"{type(opt).__name__}.step ran its closure {len(calls)} times (grad enabled: {calls})"
    assert loss is not None, f"{type(opt).__name__}.step did not return the closure's loss"
    return float(loss.detach())


def _build(model: nn.Module, name: str, impl: str | None, *, lr: float | None = None, weight_decay: float = 0.0):
    spec = _spec(name)
    lr = lr if lr is not None else spec.get("lr", get_optimizer_info(name).default_lr)
    hparams = dict(spec["hparams"]) if impl is None else {**spec["hparams"], "impl": impl}
    return build_optimizer(model, name, lr=lr, weight_decay=weight_decay, **hparams)


@pytest.mark.parametrize(("name", "impl"), CASES)
def test_builds_and_takes_three_steps(name: str, impl: str | None) -> None:
    torch.manual_seed(0)
    model = Net()
    before = copy.deepcopy(model.state_dict())
    opt = _build(model, name, impl, weight_decay=0.01)
    x, y = _data()
    losses = [_step(model, opt, x, y) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items()), f"{name} changed no parameter"


#: steps of the convergence test for impl="triton" on the CPU: Triton's interpreter runs a step in
#: about 0.2 s, so 300 steps per name would take minutes; there the test follows the for_loop
#: trajectory for this many steps instead (the 300-step threshold is the for_loop's own test)
INTERPRETER_STEPS = 40


def _losses(name: str, impl: str | None, steps: int) -> list[float]:
    torch.manual_seed(0)
    model = Net()
    opt = _build(model, name, impl)
    x, y = _data()
    return [_step(model, opt, x, y) for _ in range(steps + 1)]


@pytest.mark.parametrize(("name", "impl"), CASES)
def test_converges_on_regression(name: str, impl: str | None) -> None:
    spec = _spec(name)
    if impl == "triton" and not torch.cuda.is_available():
        got = _losses(name, impl, INTERPRETER_STEPS)
        ref = _losses(name, "for_loop", INTERPRETER_STEPS)
        assert got[-1] < got[0], f"{name}: loss {got[0]:.4f} -> {got[-1]:.4f}"
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-6, msg=f"{name}: triton's losses leave for_loop's")
        return
    losses = _losses(name, impl, spec["steps"])
    first, last = losses[0], losses[-1]
    assert last < spec["loss_threshold"] * first, f"{name}: loss {first:.4f} -> {last:.4f}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("name", "impl"), CASES)
def test_keeps_parameter_dtype(name: str, impl: str | None, dtype: torch.dtype) -> None:
    spec = _spec(name)
    if dtype is torch.bfloat16 and not spec["bf16"]:
        pytest.skip(f"{name}: no bfloat16 parameters: {spec.get('why')}")
    torch.manual_seed(0)
    model = Net().to(dtype)
    x, y = _data()
    refused = spec.get("refuses", {}).get((impl, str(dtype).removeprefix("torch.")))
    if refused:
        with pytest.raises(ValueError, match=refused):
            _step(model, _build(model, name, impl, weight_decay=0.01), x.to(dtype), y)
        return
    opt = _build(model, name, impl, weight_decay=0.01)
    for _ in range(3):
        _step(model, opt, x.to(dtype), y)
    for n, p in model.named_parameters():
        assert p.dtype == dtype, f"{name} changed {n} to {p.dtype}"
        assert torch.isfinite(p).all(), f"{name} made {n} non-finite in {dtype}"


def _two_group_model() -> tuple[nn.Module, list[dict]]:
    torch.manual_seed(0)
    model = Net()
    # identical weights in fc1/fc2-shaped pairs are not possible; compare fc2 (wd) with a copy (no wd)
    twin = nn.Linear(32, 32)
    twin.load_state_dict(model.fc2.state_dict())
    model.twin = twin
    return model, [
        {"params": [model.fc2.weight], "param_names": ["fc2.weight"], "weight_decay": 0.5},
        {"params": [model.twin.weight], "param_names": ["twin.weight"], "weight_decay": 0.0},
        {"params": [model.fc1.weight, model.fc1.bias], "param_names": ["fc1.weight", "fc1.bias"], "lr": 0.0, "weight_decay": 0.0},
    ]


@pytest.mark.parametrize(("name", "impl"), CASES)
def test_honours_param_groups(name: str, impl: str | None) -> None:
    model, groups = _two_group_model()
    spec = _spec(name)
    lr = spec.get("lr", get_optimizer_info(name).default_lr)
    opt = build_optimizer(groups, name, lr=lr, **spec["hparams"], **({} if impl is None else {"impl": impl}))
    frozen = model.fc1.weight.detach().clone()
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grad = 1e-3 * torch.randn(32, 32, generator=g)
        model.fc2.weight.grad = grad.clone()
        model.twin.weight.grad = grad.clone()
        model.fc1.weight.grad = torch.randn(32, 8, generator=g)
        model.fc1.bias.grad = torch.randn(32, generator=g)
        opt.step()
    assert torch.equal(model.fc1.weight, frozen), f"{name} moved a parameter whose group has lr=0"
    decayed, plain = model.fc2.weight.norm(), model.twin.weight.norm()
    assert decayed < plain, f"{name} ignored a group's weight_decay ({decayed:.6f} vs {plain:.6f})"


@pytest.mark.parametrize(("name", "impl"), CASES)
def test_skips_parameters_without_grad(name: str, impl: str | None) -> None:
    torch.manual_seed(0)
    model = Net()
    opt = _build(model, name, impl, weight_decay=0.01)
    x, y = _data()
    model.fc1.weight.requires_grad_(False)  # autograd leaves its .grad None; it stays in the optimizer
    before = model.fc1.weight.detach().clone()
    for _ in range(3):
        _step(model, opt, x, y)
    assert torch.equal(model.fc1.weight, before), f"{name} moved a parameter whose grad is None"


def _state_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, dict):
            if not isinstance(vb, dict) or not _state_equal(va, vb):
                return False
        elif isinstance(va, torch.Tensor):
            if not (isinstance(vb, torch.Tensor) and va.shape == vb.shape and torch.equal(va, vb)):
                return False
        elif isinstance(va, (list, tuple)):
            if len(va) != len(vb) or not all(
                _state_equal({0: x}, {0: y}) for x, y in zip(va, vb)
            ):
                return False
        elif va != vb and not (isinstance(va, float) and math.isnan(va) and math.isnan(vb)):
            return False
    return True


@pytest.mark.parametrize(("name", "impl"), CASES)
def test_grad_scaler_inf_skips_step(name: str, impl: str | None) -> None:
    torch.manual_seed(0)
    model = Net()
    opt = _build(model, name, impl, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = _data()
    for bad in (False, True):
        opt.zero_grad(set_to_none=True)
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        if bad:
            model.fc2.weight.grad[0, 0] = float("inf")
            params = copy.deepcopy(model.state_dict())
            state = copy.deepcopy(opt.state_dict())
        scaler.step(opt)
        scaler.update()
    assert _state_equal(params, model.state_dict()), f"{name} changed parameters on an inf gradient"
    assert _state_equal(state, opt.state_dict()), f"{name} changed its state on an inf gradient"


@pytest.mark.parametrize(("name", "impl"), CASES)
def test_state_dict_round_trip(name: str, impl: str | None) -> None:
    n = 4
    x, y = _data()

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = Net()
        return model, _build(model, name, impl, weight_decay=0.01)

    straight, opt = fresh()
    for _ in range(2 * n):
        _step(straight, opt, x, y)

    first, opt1 = fresh()
    for _ in range(n):
        _step(first, opt1, x, y)
    saved_model = copy.deepcopy(first.state_dict())
    saved_opt = copy.deepcopy(opt1.state_dict())
    del first, opt1

    resumed, opt2 = fresh()
    resumed.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    for _ in range(n):
        _step(resumed, opt2, x, y)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name}: {k} differs after save/load ({(a - b).abs().max():.3e})"


# -- torch.optim's contract beyond stepping: hooks, bad params, per-group options, complex tensors.
# Cheap tests (a 4x4 weight, one step): one case per name, not per impl, except the complex test.

def _written_here(name: str) -> bool:
    """The class behind ``name`` is ours (not torch's own class, not bitsandbytes')."""
    info = get_optimizer_info(name)
    return not hasattr(info.cls, "torch_class") and info.extra != "bnb"


NAME_CASES = [pytest.param(name, id=name) for name in NAMES if _written_here(name)]
OUR_CASES = [c for c in CASES if _written_here(c.values[0])]


def _small(name: str, params=None, **kw):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 4))
    b = nn.Parameter(torch.randn(4))
    spec = _spec(name)
    lr = spec.get("lr", get_optimizer_info(name).default_lr)
    if params is None:
        params = [{"params": [w, b], "param_names": ["fc.weight", "fc.bias"]}]
    return build_optimizer(params, name, lr=lr, **{**spec["hparams"], **kw}), w, b


def _ours(opt: torch.optim.Optimizer) -> bool:
    return type(opt).__module__.startswith("lightning_opt.")


@pytest.mark.parametrize("name", NAME_CASES)
def test_hooks_run_as_on_a_torch_optimizer(name: str) -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    opt, w, b = _small(name)
    calls: list[str] = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global_pre") if o is opt else None),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append("global_post") if o is opt else None),
    ]
    handles += [
        opt.register_step_pre_hook(lambda o, a, k: calls.append("pre")),
        opt.register_step_post_hook(lambda o, a, k: calls.append("post")),
        opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre")),
        opt.register_state_dict_post_hook(lambda o, sd: (calls.append("sd_post"), {**sd, "marker": 1})[1]),
        opt.register_load_state_dict_pre_hook(
            lambda o, sd: (calls.append("load_pre"), {k: v for k, v in sd.items() if k != "marker"})[1]
        ),
        opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post")),
    ]
    # every optimizer object a step reaches (a wrapper's inner one too): the global hook runs once
    inner: list[str] = []
    handles.append(register_optimizer_step_pre_hook(lambda o, a, k: inner.append(type(o).__name__)))
    try:
        w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
        opt.step()
        sd = opt.state_dict()
        assert sd.get("marker") == 1, f"{name}: a state-dict post-hook's returned dict was not used"
        opt.load_state_dict(sd)
    finally:
        for h in handles:
            h.remove()
    assert calls == ["global_pre", "pre", "post", "global_post", "sd_pre", "sd_post", "load_pre", "load_post"], (
        f"{name}: hooks ran as {calls}"
    )
    assert len(inner) == 1, f"{name}: a global step pre-hook ran {len(inner)} times in one step ({inner})"


@pytest.mark.parametrize("name", NAME_CASES)
def test_bad_params_get_torchs_errors(name: str) -> None:
    info = get_optimizer_info(name)
    w = nn.Parameter(torch.randn(4, 4))
    v = nn.Parameter(torch.randn(4))
    with pytest.raises(TypeError, match="should be an iterable of Tensors or dicts, but got torch.FloatTensor"):
        info.cls(w)
    with pytest.raises(ValueError, match="optimizer got an empty parameter list"):
        info.cls([])
    with pytest.raises(ValueError, match="all optimizer param groups should be with/without names"):
        info.cls([{"params": [("fc.weight", w)]}, {"params": [v]}])


def _bad_group_options(opt: torch.optim.Optimizer) -> list[dict]:
    d = opt.defaults
    bad: list[dict] = []
    inner = getattr(opt, "base_optimizer", None)
    if inner is not None:  # Lookahead: its own options here, the inner optimizer's checked by it
        bad += [{"lookahead_k": 0}, {"lookahead_alpha": 1.5}]
        if not _ours(inner):
            return bad  # torch's classes check no group option in add_param_group
        d = inner.defaults
    bad += [{"lr": -1.0}, {"weight_decay": float("nan")}]
    if "impl" in d:
        bad.append({"impl": "fast"})
    if isinstance(d.get("betas"), tuple) and None not in d["betas"]:
        bad += [{"betas": (*d["betas"], 0.9)}, {"betas": d["betas"][:1]}, {"betas": (1.5,) * len(d["betas"])}]
    if "eps" in d and isinstance(d["eps"], float):
        bad.append({"eps": -1.0})
    if "momentum" in d and isinstance(d["momentum"], float):
        bad.append({"momentum": 1.5})
    bad += [{key: "false"} for key, value in d.items() if isinstance(value, bool)]
    if "kahan_sum" in d and "stochastic_rounding" in d:
        bad.append({"kahan_sum": True, "stochastic_rounding": True})
    # a class's own option_checks: the bad values known here for its keys
    checks = getattr(type(inner if inner is not None else opt), "option_checks", {})
    bad += [{k: _OWN_BAD[k]} for k in checks if k in d and k in _OWN_BAD]
    return bad


#: a bad value for each key of a class's ``option_checks`` (Muon, SOAP, Lookahead, ...)
_OWN_BAD = {
    "ns_dtype": "float8",
    "ns_steps": 0,
    "eps": 0.0,
    "adjust_lr_fn": "rms",
    "adamw_lr_ratio": -1.0,
    "adamw_eps": -1.0,
    "adamw_betas": (0.9,),
    "adamw_patterns": "embed",
    "shampoo_beta": 1.0,
    "precondition_frequency": 0,
    "max_precond_dim": 0,
    "lookahead_k": 0,
    "lookahead_alpha": 0.0,
    "betas": (0.9, 1.0),
    "momentum": 0.0,  # schedule-free SGD interpolates with it: (0, 1)
    "rho": -1.0,
    "bs": 0,
    "warmup_steps": 1.5,
    "r": -1.0,
    "weight_lr_power": -1.0,
    "dampening": 2.0,
    "trust_coeff": 0.0,
    "max_lr": -1.0,
    "alpha_init": 1.5,
    "gamma": 1.0,
    "lamb": float("inf"),
    "grokking_signal_decay_rate": float("nan"),
    "gradient_clipping": -1.0,
    "rank": 0,
    "scale": 0.0,
    "scale_type": "row",
    "update_proj_gap": 0,
    "proj": "svd",
    "norm_growth_limit": 0.5,
    "convention": "galore",
    "clip_threshold": 0.0,
    "decay_rate": 0.5,
    "k": 0,
    "alpha": 0.0,
    "distributed": "nccl",
    "epsilon": -1.0,
    "max_preconditioner_dim": 0,
    "start_preconditioning_step": -1,
    "inv_root_override": -1,
    "grafting": "lion",
    "grafting_beta2": 1.5,
    "grafting_epsilon": -1.0,
    "root_dtype": "float8",
    "use_nesterov": "yes",
    "use_bias_correction": "yes",
    "use_decoupled_weight_decay": "yes",
    "merge_dims": "yes",
    "precondition_1d": "yes",
}


def test_every_own_option_check_has_a_known_bad_value() -> None:
    """The group-options test tries ``_OWN_BAD[key]`` for every key of a class's ``option_checks``."""
    missing = {
        (name, key)
        for name in NAMES
        for key in getattr(get_optimizer_info(name).cls, "option_checks", {})
        if key not in _OWN_BAD
    }
    assert not missing, f"add a bad value to _OWN_BAD for {sorted(missing)}"


@pytest.mark.parametrize("name", NAME_CASES)
def test_group_options_are_checked_before_the_group_is_added(name: str) -> None:
    opt, w, b = _small(name)
    n = len(opt.param_groups)
    for options in _bad_group_options(opt):
        extra = nn.Parameter(torch.randn(3, 3))
        with pytest.raises(ValueError, match="is invalid"):
            opt.add_param_group({"params": [extra], "param_names": ["extra.weight"], **options})
        assert len(opt.param_groups) == n, f"{name}: a refused group {options} stayed in param_groups"
    # a valid group with its own options steps with them
    extra = nn.Parameter(torch.randn(3, 3))
    opt.add_param_group({"params": [extra], "param_names": ["extra.weight"], "lr": 0.0})
    extra.grad = torch.ones_like(extra)
    before = extra.detach().clone()
    opt.step()
    assert torch.equal(extra, before), f"{name}: a group added with lr=0 moved"


def _complex_runs(name: str, impl: str | None) -> tuple:
    spec = _spec(name)
    lr = spec.get("lr", get_optimizer_info(name).default_lr)
    hparams = dict(spec["hparams"]) if impl is None else {**spec["hparams"], "impl": impl}
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(4, 3, dtype=torch.complex128, generator=g)
    grads = [torch.randn(4, 3, dtype=torch.complex128, generator=g) for _ in range(3)]
    z = nn.Parameter(z0.clone())
    r = nn.Parameter(torch.view_as_real(z0).clone())
    def make(p: nn.Parameter) -> torch.optim.Optimizer:
        return build_optimizer([{"params": [p], "param_names": ["z"]}], name, lr=lr, weight_decay=0.01, **hparams)

    return z, r, grads, make


@pytest.mark.parametrize(("name", "impl"), OUR_CASES)
def test_complex_parameters_step_as_their_real_pair_or_are_refused(name: str, impl: str | None) -> None:
    z, r, grads, make = _complex_runs(name, impl)
    try:
        opt_z = make(z)
    except ValueError as err:
        # ours: per-tensor/matrix statistics; torch's fused kernels (inside Lookahead): torch's refusal
        assert re.search(r"does not support complex parameters|kernel does not update torch.complex", str(err)), err
        return
    opt_r = make(r)
    for grad in grads:
        z.grad, r.grad = grad.clone(), torch.view_as_real(grad).clone()
        opt_z.step()
        opt_r.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach(), rtol=1e-12, atol=1e-14)
