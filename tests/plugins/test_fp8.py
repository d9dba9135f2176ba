"""FP8Precision: numerics of the torch backend against float64, module selection, validation, fallbacks,
the Trainer and LightningCLI, checkpoints, torchao on the CPU and the Transformer Engine wiring."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import types
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_opt.plugins import FP8Precision
from lightning_opt.plugins import _fp8_backends as backends
from lightning_opt.plugins import fp8 as fp8_mod
from lightning_opt.plugins._fp8_torch import (
    E4M3,
    E5M2,
    RECIPES,
    DelayedState,
    FP8Linear,
    dequantize,
    fp8_linear,
    quantize,
    sqnr_db,
)

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None

# ------------------------------------------------------------------------------------ numerics
# measured on this data (seed 0): forward ~28.5 dB, input/weight gradients ~24.5 dB for every recipe
# (e4m3 has 3 mantissa bits, e5m2 2); the floor for tensorwise is 18 / 17 dB
SQNR_BOUNDS = {name: (27.0, 23.0) for name in RECIPES}


def _reference(m: int = 128, k: int = 256, n: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) * 0.05
    gy = torch.randn(m, n, generator=g, dtype=torch.float64)
    return x, w, gy, x @ w.T, gy @ w, gy.T @ x


def _fp8_grads(recipe: str, matmul: str, x, w, gy):
    xx, ww = x.float().requires_grad_(), w.float().requires_grad_()
    state = DelayedState(16, 0) if recipe == "delayed" else None
    y = fp8_linear(xx, ww, recipe=recipe, matmul=matmul, state=state)
    y.backward(gy.float())
    return y, xx.grad, ww.grad


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_sqnr_against_float64(recipe: str) -> None:
    x, w, gy, y_ref, dx_ref, dw_ref = _reference()
    y, dx, dw = _fp8_grads(recipe, "dequantized", x, w, gy)
    fwd, grad = SQNR_BOUNDS[recipe]
    assert sqnr_db(y_ref, y) >= max(fwd, 18.0)
    assert sqnr_db(dx_ref, dx) >= max(grad, 17.0)
    assert sqnr_db(dw_ref, dw) >= max(grad, 17.0)
    # and it is FP8: far from what an fp32 GEMM gives (> 100 dB)
    assert sqnr_db(y_ref, y) < 40.0


@pytest.mark.parametrize("recipe", [r for r, spec in RECIPES.items() if spec.scaled_mm])
def test_scaled_mm_path_equals_dequantized_path(recipe: str) -> None:
    # torch's CPU build has _scaled_mm with per-tensor and row scales: the FP8-tensor-core path's scale
    # layouts and operand orders are checked here against the dequantized GEMMs
    x, w, gy, *_ = _reference(64, 128, 96)
    for a, b in zip(_fp8_grads(recipe, "scaled_mm", x, w, gy), _fp8_grads(recipe, "dequantized", x, w, gy)):
        torch.testing.assert_close(a, b, rtol=1e-2 if recipe == "rowwise" else 1e-5, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a CUDA GPU with FP8 (compute capability >= 8.9)",
)
@pytest.mark.parametrize("recipe", ["tensorwise", "delayed", "rowwise"])
def test_gpu_scaled_mm_equals_dequantized_and_keeps_sqnr(recipe: str) -> None:
    x, w, gy, y_ref, dx_ref, dw_ref = (t.cuda() for t in _reference())
    fast = _fp8_grads(recipe, "scaled_mm", x, w, gy)
    for a, b in zip(fast, _fp8_grads(recipe, "dequantized", x, w, gy)):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    assert sqnr_db(y_ref, fast[0]) >= 27.0 and sqnr_db(dw_ref, fast[2]) >= 23.0


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao not installed (pip install 'lightning-opt[torchao]')")
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_forward_matches_torchao(recipe: str) -> None:
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(128, 64))
    # the same CPU GEMM (rowwise: bf16 output), so only the quantization is compared
    ours = FP8Linear.from_linear(ref[0], recipe=recipe, matmul="scaled_mm")
    # torchao's rowwise recipe rounds scales to powers of two; ours does not
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), round_scales_to_power_of_2=False)
    convert_to_float8_training(ref, config=config)
    x = torch.randn(32, 128)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    if recipe == "tensorwise":
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    else:  # ~1% of the inputs land on the other side of an FP8 rounding boundary; FP8 itself is ~28 dB
        assert sqnr_db(b, a) > 40.0 and (a != b).float().mean() < 0.03


def test_quantize_saturates_and_scales_per_block() -> None:
    t = torch.tensor([[1.0, -2.0, 3.0, 1e6]])
    q, s = quantize(t, E4M3, (0, 0), scale=torch.tensor(1.0))
    assert torch.isfinite(q.float()).all() and q.float().max() == 448.0 and q.float()[0, 1] == -2.0
    q, _ = quantize(torch.tensor([[1e9, -1e9]]), E5M2, (0, 0), scale=torch.tensor(1.0))
    assert q.float().tolist() == [[57344.0, -57344.0]]
    # a huge block leaves the scales of the others alone
    t = torch.randn(256, 256)
    t[:128, :128] *= 1e4
    q, s = quantize(t, E4M3, (128, 128))
    assert s.shape == (2, 2) and s[0, 0] > 1e3 * s[1, 1]
    step = dequantize(torch.ones_like(q), s, (128, 128)) * 2.0**-9  # e4m3's smallest subnormal, per block
    assert ((dequantize(q, s, (128, 128)) - t).abs() <= 2.0**-4 * t.abs() + step / 2).all()


def test_mxfp8_scales_are_powers_of_two_and_nothing_saturates() -> None:
    t = torch.randn(64, 96) * torch.logspace(-3, 3, 96)
    q, s = quantize(t, E4M3, (1, 32), pow2=True)
    assert s.shape == (64, 3)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    assert (q.float().abs().amax(dim=1) <= 448).all()
    rel = ((dequantize(q, s, (1, 32)) - t).abs() / t.abs().clamp(min=1e-30)).reshape(64, 3, 32)
    big = t.abs().reshape(64, 3, 32) >= t.abs().reshape(64, 3, 32).amax(-1, keepdim=True) / 4
    assert rel[big].max() <= 2**-4  # 3 mantissa bits, round to nearest


def test_delayed_scaling_history() -> None:
    state = DelayedState(history_len=3, margin=1)
    lin = FP8Linear(16, 16, recipe="delayed", amax_history_len=3, margin=1)
    lin.fp8_state = state
    amaxes = []
    for step, scale in enumerate([1.0, 4.0, 2.0, 0.5, 0.25]):
        x = torch.full((8, 16), scale)
        x[0, 0] = -2 * scale  # the amax
        lin(x).sum().backward()
        amaxes.append(2 * scale)
        state.update()
        window = max(amaxes[-3:])
        assert state.scale[0].item() == pytest.approx(448.0 / window / 2)
    assert state.amax_history[0].tolist() == [0.0, 0.5, 1.0]  # rolled: newest after the fresh slot
    # scales freeze outside training: evaluation does not record
    before = state.amax_history.clone()
    lin.eval()
    lin(torch.ones(8, 16) * 100)
    assert torch.equal(state.amax_history, before)


def test_delayed_scaling_takes_the_max_over_accumulated_micro_batches() -> None:
    lin = FP8Linear(16, 16, recipe="delayed")
    for scale in (3.0, 1.0):  # two micro-batches, one optimizer step
        (lin(torch.full((4, 16), scale)) * scale).sum().backward()
    hist = lin.fp8_state.amax_history
    assert hist[0, 0].item() == 3.0 and hist[2, 0].item() == 3.0  # input and output-gradient amaxes
    lin.fp8_state.update()
    assert lin.fp8_state.scale[2].item() == pytest.approx(57344.0 / 3.0)  # e5m2 for the gradient


def test_fp8_linear_keeps_dtype_device_bias_and_state_dict_keys() -> None:
    lin = nn.Linear(32, 48, dtype=torch.float64)
    f = FP8Linear.from_linear(lin, recipe="rowwise")
    assert f.weight is lin.weight and f.bias is lin.bias and f.weight.dtype == torch.float64
    assert set(f.state_dict()) == {"weight", "bias"}
    nob = FP8Linear.from_linear(nn.Linear(32, 48, bias=False))
    assert nob.bias is None
    x = torch.randn(4, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert nob(x).dtype == torch.bfloat16  # the autocast dtype, as other layers under autocast
    assert nob(x).shape == (4, 5, 48)


# ---------------------------------------------------------------------------------- selection
class _Net(nn.Module):
    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.embed_proj = nn.Linear(d, d)
        self.wte = nn.Embedding(100, d)
        self.body = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d), nn.Linear(d, 24))
        self.attn = nn.MultiheadAttention(d, 2)
        self.lm_head = nn.Linear(d, 100, bias=False)
        self.tied = nn.Linear(d, 100, bias=False)
        self.tied.weight = self.wte.weight


def _reasons(plugin: FP8Precision) -> dict[str, str]:
    return {r.name: r.reason for r in plugin.converted}


def test_selection_report_and_conversion() -> None:
    net = _Net()
    plugin = FP8Precision(skip_first=False)
    plugin.convert_layers(net)
    reasons = _reasons(plugin)
    assert reasons["body.0"] == reasons["body.2"] == "converted"
    assert "skip pattern 'embed'" in reasons["embed_proj"]
    assert "lm_head" in reasons["lm_head"] and "tied to embedding 'wte'" in reasons["tied"]
    assert "not multiples of 16" in reasons["body.3"]
    assert "subclass" in reasons["attn.out_proj"]
    assert isinstance(net.body[0], FP8Linear) and type(net.body[3]) is nn.Linear
    assert plugin.active and 0 < plugin.fp8_flop_fraction < 1
    assert plugin.convert_layers(net) is net and isinstance(net.body[0], FP8Linear)  # idempotent


def test_skip_first_block_multiple_and_user_patterns() -> None:
    net = _Net(d=128)
    plugin = FP8Precision(recipe="block", skip=[r"lm_head", r"tied"], skip_first=True)
    with pytest.warns(UserWarning, match="matches no nn.Linear"):
        FP8Precision(skip=["nothing_here", "body"]).convert_layers(_Net())
    plugin.convert_layers(net)
    r = _reasons(plugin)
    assert r["embed_proj"] == "first layer (skip_first=True)"  # user patterns replace the default
    assert r["body.0"] == "converted" and "not multiples of 128" in r["body.3"]


def test_warns_when_every_eligible_layer_is_skipped() -> None:
    with pytest.warns(UserWarning, match="every FP8-eligible Linear is skipped"):
        FP8Precision(skip=["."]).convert_layers(nn.Sequential(nn.Linear(16, 16)))
    with pytest.warns(UserWarning, match="no nn.Linear with both dims multiples of 16"):
        FP8Precision().convert_layers(nn.Sequential(nn.Linear(10, 16)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": "tpu"}, "backend='tpu'"),
        ({"recipe": "current"}, "backend 'torch' has the recipes"),
        ({"backend": "torchao", "recipe": "delayed"}, "backend 'torchao' has the recipes"),
        ({"fallback": "fp32"}, "fallback"),
        ({"precision": "16-mixed"}, "precision"),
        ({"skip": "lm_head"}, "list of regex"),
        ({"skip": ["("]}, "not a regex"),
        ({"amax_history_len": 8}, "only to recipe='delayed'"),
        ({"recipe": "delayed", "amax_history_len": 0}, "int >= 1"),
        ({"recipe": "delayed", "margin": -1}, "int >= 0"),
        ({"te_layernorm": True}, "only to backend='transformer_engine'"),
        ({"backend": "torchao", "recipe": "rowwise", "fsdp_float8_all_gather": True}, "tensorwise"),
        ({"skip_first": "yes"}, "bool"),
    ],
)
def test_bad_options_fail_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FP8Precision(**kwargs)


# --------------------------------------------------------------------------- requirements, fallback
@pytest.mark.parametrize(
    ("backend", "recipe", "device", "cc", "cuda", "missing"),
    [
        ("torch", "block", "cpu", None, None, None),
        ("torchao", "rowwise", "cpu", None, None, None),
        ("transformer_engine", "delayed", "cpu", None, None, "needs a CUDA GPU"),
        ("torch", "tensorwise", "cuda", (8, 0), "12.4", "compute capability >= 8.9"),
        ("transformer_engine", "delayed", "cuda", (8, 9), "12.4", None),
        ("transformer_engine", "block", "cuda", (9, 0), "12.8", "CUDA >= 12.9"),
        ("transformer_engine", "block", "cuda", (8, 9), "12.9", "compute capability >= 9.0"),
        ("transformer_engine", "block", "cuda", (9, 0), "12.9", None),
        ("transformer_engine", "mxfp8", "cuda", (9, 0), "12.9", ">= 10.0"),
        ("transformer_engine", "nvfp4", "cuda", (10, 0), "12.9", None),
    ],
)
def test_device_requirements(backend, recipe, device, cc, cuda, missing) -> None:
    got = backends.requirement(backend, recipe, torch.device(device), cc, cuda)
    assert (got is None) if missing is None else (missing in got)


def _te_missing() -> bool:
    try:
        backends.import_te()
    except ModuleNotFoundError:
        return True
    return False


@pytest.mark.skipif(not _te_missing(), reason="transformer_engine imports here")
def test_transformer_engine_missing_falls_back_or_raises() -> None:
    net = nn.Sequential(nn.Linear(16, 16))
    with pytest.raises(ModuleNotFoundError, match=r"lightning-opt\[fp8\]"):
        FP8Precision(backend="transformer_engine", fallback="error").convert_layers(net)
    plugin = FP8Precision(backend="transformer_engine", precision="32-true")
    with pytest.warns(UserWarning, match=r"needs transformer-engine.*training in bf16-mixed"):
        plugin.convert_layers(net)
    assert not plugin.active and plugin.precision == "bf16-mixed" and type(net[0]) is nn.Linear
    assert "fallback to bf16-mixed" in plugin.converted[0].reason
    with plugin.forward_context():
        assert net(torch.randn(2, 16)).dtype == torch.bfloat16


def test_missing_capability_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fp8_mod, "_root_device", lambda module: torch.device("cuda", 0))
    monkeypatch.setattr(fp8_mod, "_probe", lambda device: ((8, 0), "12.4"))
    with pytest.raises(RuntimeError, match=r"compute capability >= 8.9.*8\.0.*fallback='error'"):
        FP8Precision(fallback="error").convert_layers(nn.Sequential(nn.Linear(16, 16)))
    plugin = FP8Precision()
    with pytest.warns(UserWarning, match="this GPU has 8.0; training in bf16-mixed"):
        plugin.convert_layers(nn.Sequential(nn.Linear(16, 16)))
    assert not plugin.active


# --------------------------------------------------------------------------------- Trainer, CLI
class _Regressor(L.LightningModule):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 64), nn.GELU(), nn.Linear(64, d), nn.GELU(), nn.Linear(d, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x).float(), y)

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _data(n: int = 64, d: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    return DataLoader(TensorDataset(x, x[:, :4].sum(-1) + 0.1 * x[:, 5]), batch_size=16)


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny GEMMs: OpenMP spinning costs more than it gives, most of all on a loaded machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _trainer(tmp_path: Path, plugin: FP8Precision | None, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, plugins=[plugin] if plugin else None, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kw,
    )


def _fit(tmp_path, plugin, epochs, ckpt=None, model=None, **kw):
    L.seed_everything(0, verbose=False)
    model = model or _Regressor()
    kw.setdefault("enable_checkpointing", True)
    trainer = _trainer(tmp_path, plugin, max_epochs=epochs, **kw)
    trainer.fit(model, _data(), ckpt_path=ckpt)
    return model, trainer


def test_trainer_delayed_resume_is_bit_exact(tmp_path: Path) -> None:
    straight, tr = _fit(tmp_path / "a", FP8Precision(recipe="delayed", precision="32-true", amax_history_len=4), 4)
    assert tr.precision_plugin.active
    _, tr1 = _fit(tmp_path / "b", FP8Precision(recipe="delayed", precision="32-true", amax_history_len=4), 2)
    ckpt = tr1.checkpoint_callback.best_model_path
    saved = torch.load(ckpt, weights_only=False)["FP8Precision"]
    assert saved["recipe"] == "delayed" and set(saved["layers"]) == {"net.0", "net.2"}
    plugin = FP8Precision(recipe="delayed", precision="32-true", amax_history_len=4)
    resumed, _ = _fit(tmp_path / "b", plugin, 4, ckpt=ckpt)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    ref = tr.precision_plugin.state_dict()["layers"]
    for name, s in plugin.state_dict()["layers"].items():
        assert torch.equal(s["amax_history"], ref[name]["amax_history"]) and torch.equal(s["scale"], ref[name]["scale"])


def test_checkpoint_into_other_recipe_or_no_fp8_warns(tmp_path: Path) -> None:
    _, tr = _fit(tmp_path, FP8Precision(recipe="delayed", precision="32-true"), 1)
    ckpt = tr.checkpoint_callback.best_model_path
    with pytest.warns(UserWarning, match="recipe='delayed'.*this run uses backend='torch', recipe='rowwise'"):
        _fit(tmp_path / "r", FP8Precision(recipe="rowwise", precision="32-true"), 2, ckpt=ckpt)
    _, tr_plain = _fit(tmp_path / "p", None, 2, ckpt=ckpt)  # no FP8: the same state_dict keys load
    assert tr_plain.global_step == 8
    with pytest.warns(UserWarning, match="saved without FP8Precision"):
        _fit(tmp_path / "s", FP8Precision(recipe="delayed", precision="32-true"), 3,
             ckpt=tr_plain.checkpoint_callback.best_model_path)


def test_trainer_fp8_with_bf16_autocast_trains_close_to_fp32(tmp_path: Path) -> None:
    losses = {}
    for recipe in ("fp32", "tensorwise"):
        plugin = None if recipe == "fp32" else FP8Precision(recipe=recipe)  # the rest in bf16-mixed
        model, _ = _fit(tmp_path / recipe, plugin, 4, enable_checkpointing=False)
        x, y = _data().dataset.tensors
        with torch.no_grad():
            losses[recipe] = float(nn.functional.mse_loss(model(x), y))
    assert losses["fp32"] < 0.5  # it learned
    for recipe in ("tensorwise",):
        assert losses[recipe] == pytest.approx(losses["fp32"], rel=0.1, abs=0.02), losses


def test_fsdp_strategy_accepts_the_plugin() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    plugin = FP8Precision()
    strategy = FSDPStrategy(precision_plugin=plugin)  # FSDPPrecision's check passes
    assert strategy.precision_plugin is plugin
    assert strategy.mixed_precision_config.param_dtype == torch.bfloat16
    assert strategy.mixed_precision_config.buffer_dtype is None  # FP8 state is never cast


def test_cli_yaml_plugin(tmp_path: Path) -> None:
    from lightning_opt.cli import _cli

    cfg = Path(__file__).resolve().parents[2] / "configs" / "recipes" / "gpt_fp8.yaml"
    cli = _cli(["--config", str(cfg), "--trainer.max_steps=1", "--trainer.logger=false",
                f"--trainer.default_root_dir={tmp_path}"], run=False, save_config=False)
    plugin = cli.trainer.precision_plugin
    assert isinstance(plugin, FP8Precision) and plugin.backend == "torch"
    plugin.convert_layers(cli.model)
    assert {r.name for r in plugin.converted if not r.converted} == {"lm_head"}  # every block Linear is eligible


# ------------------------------------------------------------------------------------ torchao
@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao not installed (pip install 'lightning-opt[torchao]')")
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise_with_gw_hp"])
def test_torchao_converts_the_selection_and_trains(recipe: str) -> None:
    from torchao.float8.float8_linear import Float8Linear

    net = _Net()
    precision = "32-true" if recipe == "rowwise_with_gw_hp" else "bf16-mixed"
    if recipe == "rowwise_with_gw_hp":
        with pytest.raises(RuntimeError, match="CPU bf16 autocast"):
            FP8Precision(backend="torchao", recipe=recipe, fallback="error").convert_layers(_Net())
    plugin = FP8Precision(backend="torchao", recipe=recipe, precision=precision)
    plugin.convert_layers(net)
    assert isinstance(net.body[0], Float8Linear) and isinstance(net.body[2], Float8Linear)
    assert type(net.lm_head) is nn.Linear and type(net.body[3]) is nn.Linear
    x = torch.randn(16, 64)
    with plugin.forward_context():
        out = net.body(x)
    out.float().sum().backward()
    assert net.body[0].weight.grad is not None
    assert out.dtype == (torch.bfloat16 if precision == "bf16-mixed" else torch.float32)


# --------------------------------------------------------------------------- Transformer Engine
def _fake_te(monkeypatch: pytest.MonkeyPatch, *, new_api: bool) -> types.SimpleNamespace:
    """A stand-in exposing the few TE names the backend uses, to check the wiring (TE needs CUDA)."""
    calls = types.SimpleNamespace(autocast=[], recipes=[])

    class Linear(nn.Linear):
        def __init__(self, i, o, bias=True, params_dtype=None, device=None):
            super().__init__(i, o, bias=bias, dtype=params_dtype, device=device)

    class LayerNorm(nn.LayerNorm):
        def __init__(self, h, eps=1e-5, params_dtype=None, device=None):
            super().__init__(h, eps=eps, dtype=params_dtype, device=device)

    class _Ctx:
        def __init__(self, **kw):
            calls.autocast.append(kw)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    te = types.ModuleType("transformer_engine.pytorch")
    te.Linear, te.LayerNorm = Linear, LayerNorm
    if new_api:
        te.autocast = _Ctx
    else:
        te.fp8_autocast = _Ctx
    recipe = types.ModuleType("transformer_engine.common.recipe")
    recipe.Format = types.SimpleNamespace(HYBRID="HYBRID", E4M3="E4M3")
    for name in ("DelayedScaling", "Float8CurrentScaling", "Float8BlockScaling"):
        setattr(recipe, name, type(name, (), {"__init__": lambda self, **kw: calls.recipes.append(kw)}))
    root = types.ModuleType("transformer_engine")
    for mod in (root, te, recipe):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(sys.modules, "transformer_engine.common", types.ModuleType("transformer_engine.common"))
    monkeypatch.setattr(fp8_mod, "_root_device", lambda module: torch.device("cuda", 0))
    monkeypatch.setattr(fp8_mod, "_probe", lambda device: ((9, 0), "12.9"))
    calls.te = te
    return calls


@pytest.mark.parametrize("new_api", [True, False])
def test_transformer_engine_wiring(monkeypatch: pytest.MonkeyPatch, new_api: bool) -> None:
    calls = _fake_te(monkeypatch, new_api=new_api)
    net = nn.Sequential(nn.LayerNorm(32, elementwise_affine=False), nn.Linear(32, 64), nn.Linear(64, 10))
    w = net[1].weight.detach().clone()
    plugin = FP8Precision(backend="transformer_engine", recipe="delayed", amax_history_len=32, margin=1,
                          te_layernorm=True, precision="32-true")
    plugin.convert_layers(net)
    assert calls.recipes == [{"margin": 1, "fp8_format": "HYBRID", "amax_history_len": 32, "amax_compute_algo": "max"}]
    assert isinstance(net[1], calls.te.Linear) and torch.equal(net[1].weight, w) and type(net[2]) is nn.Linear
    assert isinstance(net[0], calls.te.LayerNorm) and not net[0].weight.requires_grad
    assert torch.equal(net[0].weight, torch.ones(32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.autocast("cuda") on a CPU build
        with plugin.forward_context():
            pass
    key = "recipe" if new_api else "fp8_recipe"
    assert len(calls.autocast) == 1 and key in calls.autocast[0] and calls.autocast[0]["enabled"] is True
    group_key = "amax_reduction_group" if new_api else "fp8_group"
    assert calls.autocast[0][group_key] is None  # not distributed here


def test_transformer_engine_recipe_missing_from_installed_version(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_te(monkeypatch, new_api=True)  # has no MXFP8BlockScaling
    with pytest.raises(ModuleNotFoundError, match="MXFP8BlockScaling"):
        FP8Precision(backend="transformer_engine", recipe="mxfp8", fallback="error").convert_layers(
            nn.Sequential(nn.Linear(32, 32))
        )
