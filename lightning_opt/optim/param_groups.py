"""Parameter grouping: no-weight-decay sets, layer-wise LR decay, μP learning rates and LR multipliers.

The learning-rate scale of every group is baked into the group's ``lr`` (and recorded in
``lr_scale``), so any scheduler that multiplies each group's initial lr keeps the ratios. This is
the fix for timm's ``lr_scale``, which only timm's own scheduler reads.

Layer ids follow timm: a model with timm's ``group_matcher()`` gets exactly the ids of timm's
``param_groups_layer_decay``; other models get the name rule of :func:`infer_layer_id`.

μP (Yang et al. 2022, "Tensor Programs V", arXiv:2203.03466) follows the ``mup`` package's
``MuAdam`` / ``MuSGD``: every parameter gets an "infshape" (which dimensions grow with width, from a
base model or from a base width), and its lr and weight decay are scaled by its width multipliers.
"""

from __future__ import annotations

import fnmatch
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal, get_args

import torch
from torch import nn

__all__ = [
    "BLOCK_PATTERN",
    "MUP_RULES",
    "MupRule",
    "check_grouping",
    "infer_layer_id",
    "mup_infshapes",
    "mup_rule_for",
    "param_groups",
    "timm_layer_ids",
]

#: Where blocks live in common models: GPT-2 ``transformer.h.N``, Llama ``model.layers.N``, BERT
#: ``encoder.layer.N``, ViT ``blocks.N``, ConvNeXt/Swin ``stages.S.blocks.B`` / ``layers.S.blocks.B``,
#: EfficientNet ``blocks.S.B``. The first index after one of these names starts a block path.
BLOCK_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|blocks|block|h|stages)\.(\d+)(?:\.|$)")
_BLOCK_CONTAINERS = frozenset({"layers", "layer", "blocks", "block", "h", "stages"})
# the named child between a stage index and a block index: stages.S.blocks.B, layers.S.blocks.B
_STAGE_CHILDREN = frozenset({"blocks", "layers"})

_EMBED_HINT = re.compile(r"(?:^|[._])(?:embed\w*|embeddings?|wte|wpe|tok_emb\w*|pos_emb\w*|cls_token|mask_token|dist_token|patch_embed\w*)(?:$|[._])")

_HEAD = re.compile(r"(?:^|\.)(?:head|classifier)(?:\.|$)")

# timm's MATCH_PREV_GROUP: a group_matcher key ending in this ordinal joins the group before it
_MATCH_PREV_GROUP = 99999.0

MupRule = Literal["adam", "sgd"]

#: The μP lr rule of each registered name whose update is Adam-like (entrywise normalized:
#: ``mup.MuAdam``) or SGD-like (proportional to the gradient: ``mup.MuSGD``). Names not listed
#: (LAMB/LARS trust ratios, Muon's orthogonalized update, SOAP, Shampoo, Sophia, Adafactor's relative
#: step, APOLLO, (Ada)LOMO) have no μP rule here: building them with μP options is an error.
MUP_RULES: Mapping[str, MupRule] = MappingProxyType(
    {
        **dict.fromkeys(
            (
                "adam", "adamw", "nadam", "radam", "adagrad", "rmsprop", "adamw_8bit", "paged_adamw_8bit",
                "lion", "lion_8bit", "paged_lion_8bit", "stable_adamw", "grokadamw", "schedule_free_adamw",
                "schedule_free_radam", "lookahead_adamw", "lookahead_radam", "lookahead_lion",
            ),
            "adam",
        ),
        **dict.fromkeys(("sgd", "sgd_nesterov", "schedule_free_sgd", "lookahead_sgd"), "sgd"),
    }
)  # fmt: skip

_MUP_WIDTH_ATTRS = ("mup_width", "n_embd", "hidden_size", "d_model", "embed_dim", "width")
# width mode: a dimension k * width (k = 1 .. this) grows with width
_MUP_MAX_MULTIPLE = 16


def mup_rule_for(name: str) -> MupRule:
    """The μP rule (``"adam"`` or ``"sgd"``) of registry name ``name``.

    Raises:
        ValueError: the algorithm has no μP rule (see :data:`MUP_RULES`), with what to do instead.
    """
    if name in MUP_RULES:
        return MUP_RULES[name]
    if name == "muon":
        raise ValueError(
            "μP options are not applied to muon: its orthogonalized update is neither Adam- nor SGD-like. With "
            "adjust_lr_fn='original' the hidden-matrix update already has the width-independent spectral norm "
            "sqrt(max(1, fan_out/fan_in)) * lr that μP asks for; see README 'μP' for how to combine Muon with μP"
        )
    raise ValueError(
        f"{name} has no μP lr rule (μP's rules cover Adam-like and SGD-like updates: {', '.join(sorted(MUP_RULES))}); "
        "drop the mup_* options or pick one of those"
    )


# ----------------------------------------------------------------------------- validation


def _is_factor(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _compile(patterns: Iterable[str], what: str) -> list[re.Pattern[str]]:
    if isinstance(patterns, (str, bytes)):
        raise TypeError(f"{what} must be a list of regexes, not a single string; write [{patterns!r}]")
    if not isinstance(patterns, Iterable) or isinstance(patterns, Mapping):
        raise TypeError(f"{what} must be a list of regexes, got {type(patterns).__name__}")
    compiled = []
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{what} must be a list of regexes (strings); got {p!r} of type {type(p).__name__}")
        try:
            compiled.append(re.compile(p))
        except re.error as err:
            raise ValueError(f"{what} pattern {p!r} is not a valid regex: {err}") from err
    return compiled


def check_grouping(
    *,
    layer_decay: float | None = None,
    no_decay: Sequence[str] | None = None,
    lr_multipliers: Mapping[str, float] | None = None,
    mup_base_width: int | None = None,
    mup_width: int | None = None,
    mup_base_shapes: Mapping[str, Sequence[int | None]] | None = None,
    what: str = "param_groups",
) -> None:
    """Validate the grouping options that do not need the model (``OptimizerConfig`` calls it when built).

    Raises:
        TypeError: ``no_decay`` not a list of strings (a bare ``"bias"``); ``lr_multipliers`` or
            ``mup_base_shapes`` not a mapping.
        ValueError: ``layer_decay`` outside (0, 1]; a regex that does not compile; an lr multiplier
            that is not a finite number > 0; a μP width that is not a positive integer, ``mup_width``
            without ``mup_base_width``; a base shape that is not a list of positive ints / ``None``.
    """
    if layer_decay is not None and not (_is_factor(layer_decay) and layer_decay <= 1):
        raise ValueError(f"{what}(layer_decay={layer_decay!r}) is invalid; it must lie in (0, 1]")
    if no_decay is not None:
        _compile(no_decay, f"{what}(no_decay)")
    if lr_multipliers is not None:
        if not isinstance(lr_multipliers, Mapping):
            raise TypeError(f"{what}(lr_multipliers) must be a mapping regex -> factor, got {type(lr_multipliers).__name__}")
        _compile(list(lr_multipliers), f"{what}(lr_multipliers)")
        for pattern, factor in lr_multipliers.items():
            if not _is_factor(factor):
                raise ValueError(
                    f"{what}(lr_multipliers[{pattern!r}]={factor!r}) is invalid; it must be a finite number > 0 "
                    "(to freeze parameters, set requires_grad=False)"
                )
    for key, value in (("mup_base_width", mup_base_width), ("mup_width", mup_width)):
        if value is not None and not _positive_int(value):
            raise ValueError(f"{what}({key}={value!r}) is invalid; it must be a positive integer")
    if mup_width is not None and mup_base_width is None:
        raise ValueError(f"{what}(mup_width={mup_width}) needs mup_base_width, the width whose lr is the base lr")
    if mup_base_shapes is not None:
        if not isinstance(mup_base_shapes, Mapping):
            raise TypeError(f"{what}(mup_base_shapes) must be a mapping regex -> base shape, got {type(mup_base_shapes).__name__}")
        _compile(list(mup_base_shapes), f"{what}(mup_base_shapes)")
        for pattern, base in mup_base_shapes.items():
            if isinstance(base, (str, bytes)) or not isinstance(base, Sequence) or not all(b is None or _positive_int(b) for b in base):
                raise ValueError(
                    f"{what}(mup_base_shapes[{pattern!r}]={base!r}) is invalid; a base shape is a list with one entry per "
                    "dimension: the base size of a dimension that grows with width, or None for one that does not"
                )


# ----------------------------------------------------------------------------- layer ids


def _outermost_with_group_matcher(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []
    for prefix, module in model.named_modules():
        if callable(getattr(module, "group_matcher", None)) and not any(prefix.startswith(p + ".") or not p for p, _ in found):
            found.append((prefix, module))
    return found


def timm_layer_ids(module: nn.Module) -> dict[str, int]:
    """Layer ids of ``module``'s parameters from its timm ``group_matcher(coarse=False)``.

    The ids are those of timm's ``param_groups_layer_decay``: each parameter's key is the ordinal of
    the matcher entry that matches it first (``re.match``), then the regex's captured numbers, then
    the entry's suffix; unmatched parameters get the largest key; keys are sorted and numbered from
    0, except that a key ending in timm's ``MATCH_PREV_GROUP`` (99999) joins the group before it.
    """
    matcher = module.group_matcher(coarse=False)
    if isinstance(matcher, Mapping):
        specs: list[tuple[re.Pattern[str], float, tuple[float, ...]]] = []
        for ordinal, spec in enumerate(matcher.values()):
            if spec is None:
                continue
            for regex, suffix in spec if isinstance(spec, (tuple, list)) else [(spec, None)]:
                specs.append((re.compile(regex), float(ordinal), tuple(float(s) for s in suffix or ())))

        def key(name: str) -> tuple[float, ...]:
            for regex, ordinal, suffix in specs:
                m = regex.match(name)
                if m:
                    return (ordinal, *(float(g) for g in m.groups() if g is not None), *suffix)
            return (math.inf,)

    else:

        def key(name: str) -> tuple[float, ...]:
            k = matcher(name)
            return tuple(k) if isinstance(k, Iterable) else (k,)

    keys = {name: key(name) for name, _ in module.named_parameters()}
    ids: dict[tuple[float, ...], int] = {}
    lid = -1
    for k in sorted(set(keys.values())):
        if lid < 0 or k[-1] != _MATCH_PREV_GROUP:
            lid += 1
        ids[k] = lid
    return {name: ids[k] for name, k in keys.items()}


def _is_norm(module: nn.Module | None) -> bool:
    if module is None:
        return False
    norms = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)
    return isinstance(module, norms) or "Norm" in type(module).__name__


def _indexed(module: nn.Module | None) -> bool:
    children = [n for n, _ in module.named_children()] if module is not None else []
    return bool(children) and all(n.isdigit() for n in children)


def _block_path(parts: list[str], modules: Mapping[str, nn.Module]) -> str | None:
    """The dotted path of the block the parameter ``".".join(parts)`` lies in, or ``None``."""
    for i in range(1, len(parts) - 1):
        if not (parts[i].isdigit() and parts[i - 1] in _BLOCK_CONTAINERS and _indexed(modules.get(".".join(parts[:i])))):
            continue
        # a second index level: blocks.S.B (EfficientNet) or stages.S.blocks.B (ConvNeXt, Swin);
        # an index whose module is a leaf (blocks.N.1 = nn.Sequential(norm, linear)[1]) is a layer, not a block
        for j in (i + 1, i + 2):
            if j >= len(parts) - 1 or not parts[j].isdigit() or (j == i + 2 and parts[i + 1] not in _STAGE_CHILDREN):
                continue
            block = modules.get(".".join(parts[: j + 1]))
            if _indexed(modules.get(".".join(parts[:j]))) and block is not None and next(block.children(), None) is not None:
                return ".".join(parts[: j + 1])
        return ".".join(parts[: i + 1])
    return None


def _name_rule_layer_ids(model: nn.Module, names: list[str]) -> dict[str, int]:
    modules = dict(model.named_modules(remove_duplicate=False))
    owner = {n: modules.get(n.rpartition(".")[0]) for n in names}
    blocks = [_block_path(n.split("."), modules) for n in names]
    # a stage that holds blocks (stages.S.blocks.B) is no block itself: its other layers lie between blocks
    stages = {b.rsplit(".", 2 if b.split(".")[-2] in _STAGE_CHILDREN else 1)[0] for b in blocks if b is not None}
    blocks = [None if b in stages else b for b in blocks]
    order: dict[str, int] = {}
    for b in blocks:
        if b is not None and b not in order:
            order[b] = len(order) + 1  # blocks are numbered cumulatively across stages, in registration order
    if not order:
        raise ValueError(
            "layer_decay needs blocks, but no parameter name matches "
            f"{BLOCK_PATTERN.pattern!r} (h.N, layers.N, layer.N, blocks.N, stages.S.blocks.B, ...); pass layer_id=callable(name) -> int"
        )
    num_blocks = len(order)
    embedding = {n for n in names if isinstance(owner[n], (nn.Embedding, nn.EmbeddingBag)) or _EMBED_HINT.search(n)}
    block_at = [i for i, b in enumerate(blocks) if b is not None]
    ids: dict[str, int] = {}
    after_last_norms = True
    for i, name in enumerate(names):
        if blocks[i] is not None:
            ids[name] = order[blocks[i]]
        elif name in embedding or i < block_at[0]:
            ids[name] = 0
        elif i > block_at[-1]:
            # the final norm joins the last block (timm: ViT/Swin `norm`), the head is layer L + 1
            after_last_norms = after_last_norms and _is_norm(owner[name]) and not _HEAD.search(name)
            ids[name] = num_blocks if after_last_norms else num_blocks + 1
        else:
            # between blocks (a downsample layer): the block after it
            ids[name] = order[blocks[next(j for j in block_at if j > i)]]
    return ids


def infer_layer_id(model: nn.Module) -> tuple[Callable[[str], int], int]:
    """Layer ids for layer-wise LR decay, timm's where the model has timm's ``group_matcher()``.

    - A model (or one outermost submodule, e.g. the timm model inside a LightningModule) with a
      ``group_matcher()`` gets :func:`timm_layer_ids`; parameters outside that submodule get the top id.
    - Otherwise the name rule: blocks are found by their index after ``h``/``layers``/``layer``/
      ``blocks``/``block``/``stages`` (one level, ``h.N``, or two, ``stages.S.blocks.B`` /
      ``blocks.S.B``) and numbered 1..L cumulatively across stages in registration order;
      embeddings and everything registered before the first block are layer 0; a parameter between
      two blocks (a downsample layer) belongs to the block after it; the normalization layers right
      after the last block (ViT's ``norm``, GPT-2's ``ln_f``; not one inside ``head``/``classifier``)
      belong to the last block, as timm groups them; everything after those (the head) is layer L + 1.

    Returns:
        ``(layer_id, top)``: ``layer_id(name)`` for every parameter name (the first name of a tied
        parameter) and the top layer id, whose parameters get ``lr_scale = 1``.

    Raises:
        ValueError: no group_matcher and no parameter name has a block index; pass ``layer_id`` yourself.
    """
    names = [n for n, _ in model.named_parameters()]
    matchers = _outermost_with_group_matcher(model)
    if len(matchers) == 1:
        prefix, module = matchers[0]
        inner = timm_layer_ids(module)
        top = max(inner.values())
        ids = {(f"{prefix}.{n}" if prefix else n): lid for n, lid in inner.items()}
        ids = {n: ids.get(n, top) for n in names}
    else:
        ids = _name_rule_layer_ids(model, names)
        top = max(ids.values())
    return ids.__getitem__, top


# ----------------------------------------------------------------------------- μP

InfShape = list[tuple[int | None, int]]  # (base size or None for a dimension that does not grow, size)


def _model_width(model: nn.Module) -> int:
    for source in (model, getattr(model, "config", None), getattr(model, "hparams", None)):
        for attr in _MUP_WIDTH_ATTRS:
            value = source.get(attr) if isinstance(source, Mapping) else getattr(source, attr, None)
            if _positive_int(value):
                return value
    raise ValueError(
        f"mup_width=None: could not read the width of {type(model).__name__} (looked for {', '.join(_MUP_WIDTH_ATTRS)} on the "
        "model, model.config and model.hparams); pass mup_width"
    )


def mup_infshapes(
    model: nn.Module,
    *,
    base_model: nn.Module | Mapping[str, Sequence[int]] | None = None,
    base_width: int | None = None,
    width: int | None = None,
    base_shapes: Mapping[str, Sequence[int | None]] | None = None,
) -> dict[str, InfShape]:
    """Which dimensions of each parameter grow with width, μP's "infshape" (``mup.set_base_shapes``).

    Args:
        model: the model at its training width.
        base_model: the same model at the base width, or its ``{name: shape}``: a dimension whose size
            differs from the base model's grows with width (``mup``'s rule, exactly).
        base_width, width: without a base model: a dimension of size ``k * width`` (k = 1..16) grows,
            with base size ``k * base_width``, except the row count of an ``nn.Embedding`` (vocabulary,
            positions). ``width=None`` reads the width from the model (``n_embd``, ``hidden_size``,
            ``d_model``, ``embed_dim``, ``width``, on it, its ``config`` or ``hparams``). A size that
            equals a multiple of the width by chance (a 256-token vocabulary at width 64) is taken as
            growing: mark it with ``base_shapes`` or use ``base_model``.
        base_shapes: ``{regex: base shape}`` overriding both for matching names (the first pattern
            that matches a name wins): one entry per dimension, the base size of a dimension that
            grows (even if it equals the size) or ``None`` for one that does not, as in mup's
            base-shape files.

    Returns:
        ``{name: [(base or None, size), ...]}`` for every parameter (first name of a tied one).

    Raises:
        ValueError: the base model's names or ranks differ from the model's; a ``base_shapes``
            pattern that matches nothing or has the wrong length.
    """
    named = list(model.named_parameters())
    shapes: dict[str, InfShape] = {}
    if base_model is not None:
        base = {n: tuple(p.shape) for n, p in base_model.named_parameters()} if isinstance(base_model, nn.Module) else {n: tuple(s) for n, s in base_model.items()}
        missing, extra = sorted({n for n, _ in named} - set(base)), sorted(set(base) - {n for n, _ in named})
        if missing or extra:
            raise ValueError(f"mup_base_model's parameters differ from the model's: missing {missing[:5]}, extra {extra[:5]}")
        for n, p in named:
            if len(base[n]) != p.ndim:
                raise ValueError(f"mup_base_model: {n} has shape {list(base[n])} there but {list(p.shape)} in the model")
            shapes[n] = [(None if b == d else int(b), d) for b, d in zip(base[n], p.shape)]
    elif base_width is not None:
        width = _model_width(model) if width is None else width
        modules = dict(model.named_modules(remove_duplicate=False))
        for n, p in named:
            rows_fixed = isinstance(modules.get(n.rpartition(".")[0]), (nn.Embedding, nn.EmbeddingBag))
            dims: InfShape = []
            for axis, d in enumerate(p.shape):
                k = d // width
                grows = d % width == 0 and 1 <= k <= _MUP_MAX_MULTIPLE and not (rows_fixed and axis == 0)
                dims.append((k * base_width, d) if grows and k * base_width != d else (None, d))
            shapes[n] = dims
    else:
        shapes = {n: [(None, d) for d in p.shape] for n, p in named}
    if base_shapes:
        aliases, sizes, done = _aliases(model), dict(named), set()
        for pattern, base in zip(_compile(list(base_shapes), "mup_base_shapes"), base_shapes.values()):
            hits = [n for n, _ in named if any(pattern.search(a) for a in aliases[n])]
            if not hits:
                raise ValueError(f"mup_base_shapes pattern {pattern.pattern!r} matches no parameter of {type(model).__name__}")
            for n in hits:
                if n in done:  # the first matching pattern wins
                    continue
                size = sizes[n].shape
                if len(base) != len(size):
                    raise ValueError(f"mup_base_shapes[{pattern.pattern!r}]={list(base)} has {len(base)} entries but {n} has shape {list(size)}")
                shapes[n] = [(None if b is None else int(b), d) for b, d in zip(base, size)]
                done.add(n)
    return shapes


def _mult(dim: tuple[int | None, int]) -> float:
    base, size = dim
    return 1.0 if base is None else size / base


def _mup_factor(name: str, shape: InfShape, module: nn.Module | None, rule: MupRule) -> float:
    """μP's lr factor of one parameter (its weight decay gets the inverse), as mup's MuAdam / MuSGD."""
    inf = [d for d in shape if d[0] is not None]
    if len(inf) > 2:
        raise ValueError(f"μP: {name} has {len(inf)} dimensions that grow with width ({shape}); μP's rules (and mup) cover at most 2")
    if not inf:
        return 1.0
    width_mult = _mult(inf[-1])  # mup: the last growing dimension, the fan-in of a matrix
    mup = sys.modules.get("mup")
    readout = (
        isinstance(module, nn.Linear)
        and name.endswith("weight")
        and shape[0][0] is None
        and shape[1][0] is not None
        and not (mup is not None and isinstance(module, mup.MuReadout))
    )
    if readout:
        # a plain readout (no 1/width output multiplier, unlike mup.MuReadout): TP5 Table 3, lr ~ 1/fan_in
        return 1.0 / width_mult
    if rule == "adam":
        return 1.0 / width_mult if len(inf) == 2 else 1.0
    if len(inf) == 1:
        return width_mult
    fan_in, fan_out = shape[1], shape[0]
    return _mult(fan_out) / _mult(fan_in)


# ----------------------------------------------------------------------------- grouping


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Every name of each parameter, keyed by its first name (``named_parameters``' name)."""
    first: dict[int, str] = {}
    out: dict[str, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        key = first.setdefault(id(p), n)
        out.setdefault(key, []).append(n)
    return out


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    layer_decay: float | None = None,
    no_decay: Sequence[str] | None = None,
    layer_id: Callable[[str], int] | None = None,
    lr_multipliers: Mapping[str, float] | None = None,
    mup_base_width: int | None = None,
    mup_width: int | None = None,
    mup_base_model: nn.Module | Mapping[str, Sequence[int]] | None = None,
    mup_base_shapes: Mapping[str, Sequence[int | None]] | None = None,
    mup_rule: MupRule | None = None,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into optimizer param groups.

    Args:
        model: the module whose ``requires_grad`` parameters are grouped (frozen ones are left out).
            A parameter shared under several names (tied embeddings) appears once, under its first
            name; patterns match any of its names.
        lr: base learning rate; each group's ``lr`` is ``lr * lr_scale``.
        weight_decay: decay for the parameters that are decayed.
        layer_decay: timm's layer-wise LR decay ``d`` in (0, 1]: a parameter of layer ``k`` gets
            ``lr_scale = d ** (top - k)``, layer ids from :func:`infer_layer_id`. ``None`` disables it.
        no_decay: name regexes (``re.search``) of parameters without weight decay; replaces the
            default: every parameter with ``ndim <= 1``, every ``nn.Embedding`` weight, and the
            names (fnmatch patterns) that ``no_weight_decay()`` of the model or of any submodule
            returns (timm's convention for ``pos_embed``/``cls_token``).
        layer_id: callable ``name -> layer index`` that overrides the inferred layer ids (only with
            ``layer_decay``); the largest id is the top layer.
        lr_multipliers: name regex -> factor > 0 applied on top of ``lr_scale``; the first pattern
            (in mapping order) that matches a name wins.
        mup_base_width, mup_width, mup_base_model, mup_base_shapes: μP: which dimensions grow with
            width, see :func:`mup_infshapes` (a base model, or a base width and the width, and
            overrides). With any of them, each parameter's lr and weight decay are scaled as
            ``mup.MuAdam`` / ``mup.MuSGD`` scale them: Adam rule, a parameter with two growing
            dimensions ("matrix-like") gets ``lr * base_fan_in / fan_in``; SGD rule, one growing
            dimension ``lr * width / base_width``, two ``lr * (fan_out mult) / (fan_in mult)``; weight
            decay by the inverse factor. A readout (``nn.Linear`` with growing fan-in, fixed fan-out)
            that is ``mup.MuReadout`` keeps its lr (its forward divides by the width multiplier); a
            plain ``nn.Linear`` readout gets ``lr * base_width / width`` (TP5 Table 3).
        mup_rule: ``"adam"`` (entrywise-normalized updates) or ``"sgd"``; required with μP
            (``build_optimizer`` takes it from the optimizer name, :data:`MUP_RULES`).

    Returns:
        Groups ``{"params", "param_names", "lr", "lr_scale", "weight_decay"}``; parameters with
        equal settings share a group, and every trainable parameter is in exactly one.

    Raises:
        ValueError: no trainable parameters; ``layer_decay`` outside (0, 1]; ``layer_id`` without
            ``layer_decay``; a ``no_decay``, ``lr_multipliers`` or ``mup_base_shapes`` pattern that
            matches no trainable parameter; a multiplier that is not a finite number > 0; μP options
            without ``mup_rule`` or with a parameter that grows in more than 2 dimensions.
        TypeError: ``no_decay`` not a list of regexes.

    Example:
        >>> groups = param_groups(gpt, lr=3e-4, weight_decay=0.1, layer_decay=0.8)
        >>> groups = param_groups(gpt, lr=3e-3, weight_decay=0.1, mup_base_model=gpt_at_width_64, mup_rule="adam")
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups needs an nn.Module, got {type(model).__name__}")
    check_grouping(
        layer_decay=layer_decay,
        no_decay=no_decay,
        lr_multipliers=lr_multipliers,
        mup_base_width=mup_base_width,
        mup_width=mup_width,
        mup_base_shapes=mup_base_shapes,
    )
    use_mup = mup_base_width is not None or mup_base_model is not None or mup_base_shapes is not None
    if use_mup and mup_rule not in get_args(MupRule):
        raise ValueError(f"param_groups(mup_rule={mup_rule!r}) is invalid with μP options; pass 'adam' (Adam-like updates) or 'sgd'")
    if mup_rule is not None and not use_mup:
        raise ValueError(f"mup_rule={mup_rule!r} is used only with μP options (mup_base_model, mup_base_width or mup_base_shapes)")
    if mup_base_model is not None and mup_base_width is not None:
        raise ValueError("pass either mup_base_model or mup_base_width/mup_width, not both")
    if layer_id is not None and layer_decay is None:
        raise ValueError("layer_id is used only with layer_decay; pass layer_decay=d in (0, 1] too")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (all are frozen or there are none)")
    aliases = _aliases(model)

    def matches(pattern: re.Pattern[str], name: str) -> bool:
        return any(pattern.search(a) for a in aliases[name])

    if no_decay is None:
        embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
        # timm's no_weight_decay() (fnmatch patterns) on the model or on any submodule (a
        # LightningModule usually wraps the timm model: self.model.pos_embed), relative to that submodule
        skip = [
            f"{prefix}.{n}" if prefix else n
            for prefix, module in model.named_modules()
            if callable(getattr(module, "no_weight_decay", None))
            for n in module.no_weight_decay()
        ]

        def decays(name: str, p: torch.Tensor) -> bool:
            return p.ndim > 1 and id(p) not in embedding_ids and not any(fnmatch.fnmatch(a, s) for a in aliases[name] for s in skip)

    else:
        patterns = _compile(no_decay, "no_decay")
        unmatched = [p.pattern for p in patterns if not any(matches(p, n) for n, _ in named)]
        if unmatched:
            raise ValueError(f"no_decay pattern(s) {unmatched} match no trainable parameter of {type(model).__name__}")

        def decays(name: str, p: torch.Tensor) -> bool:
            return not any(matches(pat, name) for pat in patterns)

    multipliers: list[tuple[re.Pattern[str], float]] = []
    for pattern, factor in zip(_compile(list(lr_multipliers or {}), "lr_multipliers"), (lr_multipliers or {}).values()):
        if not any(matches(pattern, n) for n, _ in named):
            raise ValueError(f"lr_multipliers pattern {pattern.pattern!r} matches no trainable parameter of {type(model).__name__}")
        multipliers.append((pattern, float(factor)))

    layer_scale: Callable[[str], float] = lambda name: 1.0  # noqa: E731
    if layer_decay is not None:
        if layer_id is None:
            layer_id, top = infer_layer_id(model)
        else:
            top = max(layer_id(n) for n, _ in named)
        layer_scale = lambda name: float(layer_decay) ** (top - layer_id(name))  # noqa: E731

    mup_scale: dict[str, float] = {}
    if use_mup:
        infshapes = mup_infshapes(model, base_model=mup_base_model, base_width=mup_base_width, width=mup_width, base_shapes=mup_base_shapes)
        modules = dict(model.named_modules(remove_duplicate=False))
        mup_scale = {n: _mup_factor(n, infshapes[n], modules.get(n.rpartition(".")[0]), mup_rule) for n, _ in named}  # type: ignore[arg-type]

    for name, _ in named:
        if len(aliases[name]) > 1 and (layer_decay is not None or use_mup):
            given = ", ".join(
                ([f"layer {layer_id(name)} (lr scale {layer_scale(name):.4g})"] if layer_decay is not None else [])
                + ([f"μP lr factor {mup_scale[name]:.4g}"] if use_mup else [])
            )
            warnings.warn(
                f"parameter {name} is shared by {aliases[name]}: it is optimized once, under {name!r}, with {given}; "
                "lr_multipliers patterns match any of its names",
                stacklevel=2,
            )

    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, p in named:
        scale = layer_scale(name) * mup_scale.get(name, 1.0)
        for pattern, factor in multipliers:
            if matches(pattern, name):
                scale *= factor
                break
        wd = float(weight_decay) / mup_scale.get(name, 1.0) if decays(name, p) else 0.0
        group = groups.setdefault(
            (wd, scale),
            {"params": [], "param_names": [], "lr": lr * scale, "lr_scale": scale, "weight_decay": wd},
        )
        group["params"].append(p)
        group["param_names"].append(name)
    return list(groups.values())
