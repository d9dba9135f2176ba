"""Grouping rules: default no-decay set, regex override, layer-wise LR decay, multipliers, coverage."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_opt import param_groups
from lightning_opt.demo import TinyGPT


class TinyViT(nn.Module):
    """timm ViT names: cls_token, pos_embed, patch_embed.proj, blocks.N, norm, head."""

    def __init__(self, depth: int = 3, dim: int = 16) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}


def _where(groups: list[dict]) -> dict[str, dict]:
    out = {}
    for g in groups:
        for n in g["param_names"]:
            assert n not in out, f"{n} is in two groups"
            out[n] = g
    return out


def test_default_no_decay_set_on_gpt() -> None:
    model = TinyGPT(n_layer=2)
    where = _where(param_groups(model, lr=1.0, weight_decay=0.1))
    for name, p in model.named_parameters():
        expected = 0.0 if (p.ndim <= 1 or name.startswith(("transformer.wte", "transformer.wpe"))) else 0.1
        assert where[name]["weight_decay"] == expected, name
    assert where["lm_head.weight"]["weight_decay"] == 0.1
    assert where["transformer.h.0.attn.c_attn.weight"]["weight_decay"] == 0.1
    assert where["transformer.h.0.ln_1.weight"]["weight_decay"] == 0.0


def test_model_no_weight_decay_method_is_honoured() -> None:
    where = _where(param_groups(TinyViT(), lr=1.0, weight_decay=0.05))
    assert where["cls_token"]["weight_decay"] == 0.0
    assert where["pos_embed"]["weight_decay"] == 0.0
    assert where["patch_embed.proj.weight"]["weight_decay"] == 0.05


def test_no_weight_decay_of_a_wrapped_submodule_is_honoured() -> None:
    wrapper = nn.Module()
    wrapper.model = TinyViT()
    where = _where(param_groups(wrapper, lr=1.0, weight_decay=0.05))
    assert where["model.cls_token"]["weight_decay"] == 0.0
    assert where["model.pos_embed"]["weight_decay"] == 0.0
    assert where["model.head.weight"]["weight_decay"] == 0.05


def test_demo_vit_excludes_tokens_from_decay() -> None:
    from lightning_opt.demo import TinyViT as DemoViT

    where = _where(param_groups(DemoViT(), lr=1.0, weight_decay=0.3))
    assert where["cls_token"]["weight_decay"] == 0.0 and where["pos_embed"]["weight_decay"] == 0.0


def test_no_decay_regexes_replace_the_default() -> None:
    model = TinyGPT(n_layer=1)
    where = _where(param_groups(model, lr=1.0, weight_decay=0.1, no_decay=[r"lm_head"]))
    assert where["lm_head.weight"]["weight_decay"] == 0.0
    # the default set no longer applies: biases and embeddings decay now
    assert where["transformer.h.0.attn.c_attn.bias"]["weight_decay"] == 0.1
    assert where["transformer.wte.weight"]["weight_decay"] == 0.1


def test_every_trainable_parameter_exactly_once_and_frozen_left_out() -> None:
    model = TinyGPT(n_layer=2)
    model.transformer["wpe"].weight.requires_grad_(False)
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, layer_decay=0.7)
    where = _where(groups)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(where) == trainable
    assert "transformer.wpe.weight" not in where
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(trainable)
    for g in groups:
        assert g["params"] == [dict(model.named_parameters())[n] for n in g["param_names"]]
        assert set(g) == {"params", "param_names", "lr", "lr_scale", "weight_decay"}
    # equal settings are merged: (wd, scale) pairs are unique
    keys = [(g["weight_decay"], g["lr_scale"]) for g in groups]
    assert len(keys) == len(set(keys))


def test_layer_decay_gpt2_style() -> None:
    d, n_layer = 0.5, 3
    model = TinyGPT(n_layer=n_layer)
    where = _where(param_groups(model, lr=2.0, weight_decay=0.0, layer_decay=d))
    top = n_layer + 1  # layers: embeddings 0, blocks 1..L, head L+1
    assert where["transformer.wte.weight"]["lr_scale"] == d**top
    assert where["transformer.wpe.weight"]["lr_scale"] == d**top
    for i in range(n_layer):
        g = where[f"transformer.h.{i}.mlp.c_fc.weight"]
        assert g["lr_scale"] == d ** (top - (i + 1))
        assert g["lr"] == 2.0 * d ** (top - (i + 1))
    # the final norm joins the last block (timm's rule for ViT's `norm`), the head is the top layer
    assert where["transformer.ln_f.weight"]["lr_scale"] == d
    assert where["lm_head.weight"]["lr_scale"] == 1.0


def test_layer_decay_vit_style() -> None:
    d = 0.75
    where = _where(param_groups(TinyViT(depth=3), lr=1.0, weight_decay=0.05, layer_decay=d))
    for name in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"):
        assert where[name]["lr_scale"] == d**4, name
    assert where["blocks.0.1.weight"]["lr_scale"] == d**3
    assert where["blocks.2.1.weight"]["lr_scale"] == d**1
    assert where["norm.weight"]["lr_scale"] == d  # timm: ViT's final norm has the last block's scale
    assert where["head.weight"]["lr_scale"] == 1.0


def test_layer_id_override_and_names() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    where = _where(param_groups(model, lr=1.0, weight_decay=0.0, layer_decay=0.5, layer_id=lambda n: int(n[0])))
    assert where["0.weight"]["lr_scale"] == 0.25
    assert where["1.weight"]["lr_scale"] == 0.5
    assert where["2.weight"]["lr_scale"] == 1.0


def test_lr_multipliers_first_match_wins() -> None:
    model = TinyGPT(n_layer=1)
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, lr_multipliers={"lm_head": 10.0, r"^transformer\.h": 0.1, "weight": 3.0})
    where = _where(groups)
    assert where["lm_head.weight"]["lr"] == pytest.approx(1e-2)
    assert where["transformer.h.0.mlp.c_fc.weight"]["lr_scale"] == pytest.approx(0.1)
    assert where["transformer.wte.weight"]["lr_scale"] == pytest.approx(3.0)
    assert where["transformer.ln_f.bias"]["lr_scale"] == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"no_decay": ["nomatch_xyz"]}, "match no trainable parameter"),
        ({"lr_multipliers": {"nomatch_xyz": 2.0}}, "matches no trainable parameter"),
        ({"lr_multipliers": {"lm_head": -1.0}}, "finite number > 0"),
        ({"lr_multipliers": {"lm_head": 0.0}}, "requires_grad=False"),
        ({"lr_multipliers": {"lm_head": float("inf")}}, "finite number > 0"),
        ({"lr_multipliers": {"lm_head": float("nan")}}, "finite number > 0"),
        ({"lr_multipliers": {"lm_head": "10"}}, "finite number > 0"),
        ({"layer_decay": 0.0}, r"\(0, 1\]"),
        ({"layer_decay": 1.5}, r"\(0, 1\]"),
        ({"layer_decay": float("nan")}, r"\(0, 1\]"),
        ({"no_decay": ["("]}, "not a valid regex"),
    ],
)
def test_bad_grouping_input_is_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        param_groups(TinyGPT(n_layer=1), lr=1e-3, weight_decay=0.1, **kwargs)


def test_layer_id_needs_layer_decay() -> None:
    with pytest.raises(ValueError, match="layer_id is used only with layer_decay"):
        param_groups(TinyGPT(n_layer=1), lr=1e-3, weight_decay=0.1, layer_id=lambda n: 0)


@pytest.mark.parametrize("no_decay", ["bias", 5, {"bias": 1}, [1]])
def test_no_decay_must_be_a_list(no_decay: object) -> None:
    with pytest.raises(TypeError, match="list of regexes"):
        param_groups(TinyGPT(n_layer=1), lr=1e-3, weight_decay=0.1, no_decay=no_decay)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"lr_multipliers": {"lm_head": -1}}, ValueError, r"OptimizerConfig\(lr_multipliers\['lm_head'\]=-1\) is invalid"),
        ({"lr_multipliers": {"lm_head": 0}}, ValueError, "finite number > 0"),
        ({"lr_multipliers": {"lm_head": float("nan")}}, ValueError, "finite number > 0"),
        ({"lr_multipliers": ["lm_head"]}, TypeError, "mapping"),
        ({"no_decay": "bias"}, TypeError, r"not a single string; write \['bias'\]"),
        ({"no_decay": [3]}, TypeError, "list of regexes"),
    ],
)
def test_optimizer_config_checks_grouping_when_built(kwargs: dict, error: type, message: str) -> None:
    from lightning_opt import OptimizerConfig

    with pytest.raises(error, match=message):
        OptimizerConfig(name="adamw", lr=1e-3, **kwargs)


class _Stage(nn.Module):
    """timm ConvNeXt/Swin names: a downsample layer, then blocks.B."""

    def __init__(self, depth: int, dim: int, downsample: bool) -> None:
        super().__init__()
        self.downsample = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(depth)))


class NestedNet(nn.Module):
    """No group_matcher: stem, stages.S.{downsample, blocks.B}, a final norm, head."""

    def __init__(self, depths: tuple[int, ...] = (2, 1, 3), dim: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2)
        self.stages = nn.Sequential(*(_Stage(d, dim, downsample=i > 0) for i, d in enumerate(depths)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)


def test_nested_stages_number_blocks_cumulatively() -> None:
    d = 0.5
    where = _where(param_groups(NestedNet((2, 1, 3)), lr=1.0, weight_decay=0.0, layer_decay=d))
    # blocks 1..6 across stages, the head is layer 7
    expected = {
        "stem.weight": 0,
        "stages.0.blocks.0.1.weight": 1,
        "stages.0.blocks.1.0.weight": 2,
        "stages.1.downsample.1.weight": 3,  # a downsample layer belongs with the block after it
        "stages.1.blocks.0.1.weight": 3,
        "stages.2.downsample.0.bias": 4,
        "stages.2.blocks.0.1.weight": 4,
        "stages.2.blocks.2.1.bias": 6,
        "norm.weight": 6,  # the final norm joins the last block
        "head.weight": 7,
    }
    for name, layer in expected.items():
        assert where[name]["lr_scale"] == d ** (7 - layer), name
    assert set(where) == {n for n, _ in NestedNet((2, 1, 3)).named_parameters()}


def test_efficientnet_style_blocks_s_b_are_cumulative() -> None:
    model = nn.Module()
    model.conv_stem = nn.Conv2d(3, 4, 1)
    model.blocks = nn.Sequential(*(nn.Sequential(*(_Stage(1, 4, downsample=False) for _ in range(n))) for n in (1, 2, 2)))
    model.classifier = nn.Linear(4, 3)
    from lightning_opt.optim.param_groups import infer_layer_id

    layer_id, top = infer_layer_id(model)
    assert top == 6
    assert [layer_id(f"blocks.{s}.{b}.blocks.0.1.weight") for s, b in [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1)]] == [1, 2, 3, 4, 5]
    assert layer_id("conv_stem.weight") == 0 and layer_id("classifier.weight") == 6


def test_group_matcher_of_a_wrapped_model_is_used() -> None:
    class WithMatcher(NestedNet):
        def group_matcher(self, coarse: bool = False) -> dict:
            # timm's convention: (regex, suffix) entries; 99999 joins the previous group
            return {"stem": r"^stem", "blocks": [(r"^stages\.(\d+)", None), (r"^norm", (99999,))]}

    wrapper = nn.Module()
    wrapper.model = WithMatcher((2, 1))
    wrapper.extra = nn.Linear(2, 2)
    where = _where(param_groups(wrapper, lr=1.0, weight_decay=0.0, layer_decay=0.5))
    # stem 0, stage 0 -> 1, stage 1 -> 2, norm joins stage 1, head (unmatched) 3; outside the timm model: the top
    assert where["model.stem.weight"]["lr_scale"] == 0.5**3
    assert where["model.stages.0.blocks.1.1.weight"]["lr_scale"] == 0.5**2
    assert where["model.stages.1.downsample.1.weight"]["lr_scale"] == 0.5
    assert where["model.norm.weight"]["lr_scale"] == 0.5
    assert where["model.head.weight"]["lr_scale"] == 1.0
    assert where["extra.weight"]["lr_scale"] == 1.0


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=8, n_embd=8, n_layer=2, n_head=2))


def test_tied_weights_appear_once_and_multipliers_match_any_name() -> None:
    model = _tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, lr_multipliers={"lm_head": 10.0})
    where = _where(groups)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert "lm_head.weight" not in where
    assert where["transformer.wte.weight"]["lr"] == pytest.approx(1e-2)
    assert where["transformer.wpe.weight"]["lr"] == pytest.approx(1e-3)
    # no_decay patterns match any name too
    where = _where(param_groups(model, lr=1e-3, weight_decay=0.1, no_decay=[r"^lm_head\."]))
    assert where["transformer.wte.weight"]["weight_decay"] == 0.0
    assert where["transformer.h.0.attn.c_attn.bias"]["weight_decay"] == 0.1


def test_tied_weights_warn_which_layer_they_get() -> None:
    model = _tiny_gpt2()
    with pytest.warns(UserWarning, match=r"transformer\.wte\.weight is shared by \['transformer\.wte\.weight', 'lm_head\.weight'\].*layer 0 \(lr scale 0\.25\); lr_multipliers"):
        groups = param_groups(model, lr=1.0, weight_decay=0.0, layer_decay=0.5)
    where = _where(groups)
    # embeddings (and the tied head) 0, blocks 1..2, ln_f joins block 2: no untied head above it
    assert where["transformer.wte.weight"]["lr_scale"] == 0.5**2
    assert where["transformer.h.0.mlp.c_fc.weight"]["lr_scale"] == 0.5
    assert where["transformer.h.1.mlp.c_fc.weight"]["lr_scale"] == 1.0
    assert where["transformer.ln_f.weight"]["lr_scale"] == 1.0


def test_no_trainable_parameters() -> None:
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, lr=1e-3, weight_decay=0.0)


def test_layer_decay_without_blocks_asks_for_layer_id() -> None:
    with pytest.raises(ValueError, match="layer_id"):
        param_groups(nn.Linear(2, 2), lr=1e-3, weight_decay=0.0, layer_decay=0.8)
