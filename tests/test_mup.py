"""μP learning rates: per-parameter lr and weight decay equal what ``mup.MuAdam`` / ``mup.MuSGD`` apply.

``mup`` is a test oracle installed without dependencies (``tests/oracles-nodeps.txt``).
"""

from __future__ import annotations

import mup
import pytest
import torch
from torch import nn

from lightning_opt import OptimizerConfig, build_optimizer, param_groups
from lightning_opt.demo import TinyGPT


class MuNet(nn.Module):
    """Every kind of parameter μP tells apart, with mup's readout."""

    def __init__(self, width: int, vocab: int = 11, n_in: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)  # (fixed, width): input weights
        self.inp = nn.Linear(n_in, width)  # (width, fixed) and a (width,) bias
        self.norm = nn.LayerNorm(width)  # vector-like
        self.hidden = nn.Linear(width, 2 * width)  # matrix-like, fan-in and fan-out grow alike
        self.proj = nn.Linear(2 * width, width)
        self.conv = nn.Conv1d(width, width, 3)  # (width, width, fixed)
        self.odd = nn.Linear(width, 4 + width // 8)  # fan-out grows slower than fan-in: SGD's ratio != 1
        self.back = nn.Linear(4 + width // 8, width)
        self.scale = nn.Parameter(torch.ones(3))  # does not grow
        self.readout = mup.MuReadout(width, vocab)  # (fixed, width): divides its input by the width multiplier


def _per_parameter(model: nn.Module, groups: list[dict]) -> dict[str, tuple[float, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in groups:
        for p in g["params"]:
            assert names[id(p)] not in out
            out[names[id(p)]] = (g["lr"], g["weight_decay"])
    return out


def _mup_model(width: int, base_width: int = 8) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base, model = MuNet(base_width), MuNet(width)
    mup.set_base_shapes(model, base, rescale_params=False)
    return model, base


def _assert_equal(ours: dict, ref: dict) -> None:
    assert set(ours) == set(ref)
    for name, (lr, wd) in ref.items():
        assert ours[name][0] == pytest.approx(lr, rel=1e-12), name
        assert ours[name][1] == pytest.approx(wd, rel=1e-12), name


@pytest.mark.parametrize("width", [8, 32, 64])
@pytest.mark.parametrize(("rule", "mu_optimizer"), [("adam", mup.MuAdam), ("sgd", mup.MuSGD)])
def test_lr_and_weight_decay_equal_mups(width: int, rule: str, mu_optimizer) -> None:
    model, base = _mup_model(width)
    ref = _per_parameter(model, mu_optimizer(model.parameters(), lr=0.01, weight_decay=0.1).param_groups)
    # mup decays every parameter; no_decay=[] does the same here
    ours = _per_parameter(model, param_groups(model, lr=0.01, weight_decay=0.1, no_decay=[], mup_base_model=base, mup_rule=rule))
    _assert_equal(ours, ref)
    if width == 32:  # the rules were applied, not skipped
        assert ours["hidden.weight"][0] == pytest.approx(0.01 / 4 if rule == "adam" else 0.01)
        assert ours["norm.weight"][0] == pytest.approx(0.01 if rule == "adam" else 0.04)
        assert ours["readout.weight"][0] == pytest.approx(0.01 if rule == "adam" else 0.04)
        assert ours["scale"][0] == pytest.approx(0.01)
        if rule == "sgd":
            assert ours["odd.weight"][0] == pytest.approx(0.01 * (8 / 5) / 4)


@pytest.mark.parametrize(("name", "mu_optimizer"), [("adamw", mup.MuAdamW), ("sgd", mup.MuSGD), ("schedule_free_sgd", mup.MuSGD), ("lion", mup.MuAdam)])
def test_build_optimizer_picks_the_rule_of_the_algorithm(name: str, mu_optimizer) -> None:
    model, base = _mup_model(32)
    ref = _per_parameter(model, mu_optimizer(model.parameters(), lr=0.01, weight_decay=0.1).param_groups)
    opt = build_optimizer(model, name, lr=0.01, weight_decay=0.1, no_decay=[], mup_base_model=base)
    _assert_equal(_per_parameter(model, opt.param_groups), ref)


def test_base_shapes_mapping_equals_base_model() -> None:
    model, base = _mup_model(32)
    shapes = {n: list(p.shape) for n, p in base.named_parameters()}
    a = param_groups(model, lr=1.0, weight_decay=0.1, mup_base_model=base, mup_rule="sgd")
    b = param_groups(model, lr=1.0, weight_decay=0.1, mup_base_model=shapes, mup_rule="sgd")
    assert _per_parameter(model, a) == _per_parameter(model, b)


def _gpt(width: int, vocab: int = 100) -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(vocab_size=vocab, block_size=20, n_layer=1, n_head=2, n_embd=width)


@pytest.mark.parametrize("rule", ["adam", "sgd"])
def test_width_mode_equals_base_model_mode(rule: str) -> None:
    model = _gpt(32)
    by_base = param_groups(model, lr=1.0, weight_decay=0.1, mup_base_model=_gpt(16), mup_rule=rule)
    # mup_width=None reads the width from the model (TinyGPT's n_embd hyperparameter)
    by_width = param_groups(model, lr=1.0, weight_decay=0.1, mup_base_width=16, mup_rule=rule)
    assert _per_parameter(model, by_width) == _per_parameter(model, by_base)
    assert _per_parameter(model, by_width) == _per_parameter(model, param_groups(model, lr=1.0, weight_decay=0.1, mup_base_width=16, mup_width=32, mup_rule=rule))


def test_plain_readout_gets_table3_rule_and_embeddings_keep_their_lr() -> None:
    """TinyGPT's lm_head is a plain nn.Linear (no 1/width multiplier): Adam and SGD lr ~ 1/fan_in (TP5 Table 3)."""
    model = _gpt(64)
    adam = _per_parameter(model, param_groups(model, lr=1.0, weight_decay=0.1, mup_base_width=16, mup_rule="adam"))
    sgd = _per_parameter(model, param_groups(model, lr=1.0, weight_decay=0.1, mup_base_width=16, mup_rule="sgd"))
    assert adam["lm_head.weight"] == (0.25, pytest.approx(0.4))
    assert sgd["lm_head.weight"][0] == 0.25
    assert adam["transformer.h.0.mlp.c_fc.weight"] == (0.25, pytest.approx(0.4))  # hidden: base_fan_in / fan_in
    assert sgd["transformer.h.0.mlp.c_fc.weight"][0] == 1.0  # fan-out and fan-in grow alike
    assert adam["transformer.wte.weight"][0] == adam["transformer.wpe.weight"][0] == adam["transformer.ln_f.weight"][0] == 1.0
    assert sgd["transformer.wte.weight"][0] == sgd["transformer.h.0.ln_1.bias"][0] == 4.0  # SGD: input weights, biases ~ fan_out


def test_base_shapes_override_marks_a_coincidental_width() -> None:
    """vocab 64 at width 32 looks like 2 x width; the override says it does not grow."""
    model = _gpt(32, vocab=64)
    wrong = _per_parameter(model, param_groups(model, lr=1.0, weight_decay=0.0, mup_base_width=16, mup_rule="sgd"))
    assert wrong["lm_head.weight"][0] == 1.0  # taken as a hidden matrix
    fixed = _per_parameter(model, param_groups(model, lr=1.0, weight_decay=0.0, mup_base_width=16, mup_rule="sgd", mup_base_shapes={r"^lm_head\.": [None, 16]}))
    assert fixed["lm_head.weight"][0] == 0.5  # the readout rule
    assert {n: v for n, v in fixed.items() if n != "lm_head.weight"} == {n: v for n, v in wrong.items() if n != "lm_head.weight"}
    # alone, the override marks exactly the parameters it names
    alone = _per_parameter(model, param_groups(model, lr=1.0, weight_decay=0.0, mup_base_shapes={"c_fc.weight": [64, 16]}, mup_rule="adam"))
    assert alone["transformer.h.0.mlp.c_fc.weight"][0] == 0.5
    assert {v[0] for n, v in alone.items() if n != "transformer.h.0.mlp.c_fc.weight"} == {1.0}


def test_mup_combines_with_layer_decay_and_multipliers() -> None:
    model = _gpt(32)
    where = _per_parameter(model, param_groups(model, lr=1.0, weight_decay=0.0, layer_decay=0.5, lr_multipliers={"lm_head": 3.0}, mup_base_width=16, mup_rule="adam"))
    assert where["lm_head.weight"][0] == pytest.approx(3.0 * 0.5)
    assert where["transformer.h.0.mlp.c_fc.weight"][0] == pytest.approx(0.5 * 0.5)  # block 1 of top 2, μP 1/2


def test_optimizer_config_carries_mup_options() -> None:
    cfg = OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.1, mup_base_width=16, mup_base_shapes={"lm_head": [None, 16]})
    opt = TinyGPT(vocab_size=100, block_size=20, n_layer=1, n_embd=32, optimizer=cfg).configure_optimizers()
    lr = {n: g["lr"] for g in opt.param_groups for n in g["param_names"]}
    assert lr["lm_head.weight"] == pytest.approx(5e-4) and lr["transformer.h.0.attn.c_attn.weight"] == pytest.approx(5e-4)
    assert lr["transformer.wte.weight"] == pytest.approx(1e-3)


def test_tied_parameter_warns_with_its_mup_factor() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=8, n_embd=16, n_layer=1, n_head=2))
    with pytest.warns(UserWarning, match=r"transformer\.wte\.weight is shared by .*lm_head\.weight.*μP lr factor 1"):
        param_groups(model, lr=1.0, weight_decay=0.0, mup_base_width=8, mup_width=16, mup_rule="adam")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mup_base_width": 16}, "mup_rule"),
        ({"mup_rule": "adam"}, "only with μP options"),
        ({"mup_base_width": 16, "mup_rule": "adamw"}, "mup_rule='adamw'"),
        ({"mup_width": 32, "mup_rule": "adam"}, "needs mup_base_width"),
        ({"mup_base_width": 0, "mup_rule": "adam"}, "positive integer"),
        ({"mup_base_width": 16, "mup_width": 32.0, "mup_rule": "adam"}, "positive integer"),
        ({"mup_base_width": 16, "mup_base_model": {}, "mup_rule": "adam"}, "not both"),
        ({"mup_base_model": {"lm_head.weight": [100, 16]}, "mup_rule": "adam"}, "differ from the model's"),
        ({"mup_base_shapes": {"nomatch_xyz": [16]}, "mup_rule": "adam"}, "matches no parameter"),
        ({"mup_base_shapes": {"lm_head": [16]}, "mup_rule": "adam"}, "has 1 entries"),
        ({"mup_base_shapes": {"lm_head": [16, -1]}, "mup_rule": "adam"}, "base shape is a list"),
    ],
)
def test_bad_mup_input_is_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        param_groups(_gpt(32), lr=1e-3, weight_decay=0.1, **kwargs)


def test_more_than_two_growing_dimensions_is_rejected() -> None:
    model = nn.Module()
    model.cube = nn.Parameter(torch.zeros(32, 32, 32))
    with pytest.raises(ValueError, match=r"cube has 3 dimensions that grow.*at most 2"):
        param_groups(model, lr=1.0, weight_decay=0.0, mup_base_width=16, mup_width=32, mup_rule="adam")


def test_mup_width_must_be_readable_or_given() -> None:
    with pytest.raises(ValueError, match="pass mup_width"):
        param_groups(nn.Linear(32, 32), lr=1.0, weight_decay=0.0, mup_base_width=16, mup_rule="adam")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"name": "lamb", "mup_base_width": 16}, ValueError, "lamb has no μP lr rule"),
        ({"name": "muon", "mup_base_width": 16}, ValueError, "not applied to muon"),
        ({"name": "adamw", "mup_width": 64}, ValueError, "needs mup_base_width"),
        ({"name": "adamw", "mup_base_width": -8}, ValueError, "positive integer"),
        ({"name": "adamw", "mup_base_shapes": {"lm_head": "x"}}, ValueError, "base shape is a list"),
        ({"name": "adamw", "mup_base_shapes": ["lm_head"]}, TypeError, "mapping"),
    ],
)
def test_optimizer_config_rejects_bad_mup_options_when_built(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        OptimizerConfig(lr=1e-3, **kwargs)


def test_build_optimizer_rejects_mup_for_algorithms_without_a_rule() -> None:
    with pytest.raises(ValueError, match="not applied to muon"):
        build_optimizer(_gpt(32), "muon", lr=1e-3, mup_base_width=16)
    with pytest.raises(ValueError, match="need an nn.Module"):
        build_optimizer(list(_gpt(32).parameters()), "adamw", lr=1e-3, mup_base_width=16)
