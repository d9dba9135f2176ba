"""Parameter grouping: no-weight-decay sets, layer-wise LR decay and per-module LR multipliers.

The learning-rate scale of every group is baked into the group's ``lr`` (and recorded in
``lr_scale``), so any scheduler that multiplies each group's initial lr keeps the ratios. This is
the fix for timm's ``lr_scale``, which only timm's own scheduler reads.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["BLOCK_PATTERN", "infer_layer_id", "param_groups"]

#: Where transformer blocks live in common models: GPT-2 ``transformer.h.N``, Llama
#: ``model.layers.N``, BERT ``encoder.layer.N``, ViT ``blocks.N``. The first match in a name wins.
BLOCK_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|blocks|h)\.(\d+)(?:\.|$)")

_EMBED_HINT = re.compile(r"(?:^|[._])(?:embed\w*|embeddings?|wte|wpe|tok_emb\w*|pos_emb\w*|cls_token|mask_token|dist_token|patch_embed\w*)(?:$|[._])")


def _block_index(name: str) -> int | None:
    match = BLOCK_PATTERN.search(name)
    return int(match.group(1)) if match else None


def infer_layer_id(model: nn.Module) -> tuple[Callable[[str], int], int]:
    """Infer timm-style layer ids for ``model``'s parameters.

    Embeddings (``nn.Embedding`` weights, names like ``wte``/``pos_embed``/``cls_token``, and every
    parameter registered before the first block) are layer 0; block ``i`` is layer ``i + 1``;
    everything after the last block (final norm, head) is layer ``L + 1``.

    Returns:
        ``(layer_id, num_blocks)``.

    Raises:
        ValueError: no parameter name contains a block index; pass ``layer_id`` yourself.
    """
    names = [n for n, _ in model.named_parameters()]
    blocks = [b for b in (_block_index(n) for n in names) if b is not None]
    if not blocks:
        raise ValueError(
            "layer_decay needs block indices, but no parameter name matches "
            f"{BLOCK_PATTERN.pattern!r} (layers.N, h.N, blocks.N, layer.N); pass layer_id=callable(name) -> int"
        )
    num_blocks = max(blocks) + 1
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    first_block = next(i for i, n in enumerate(names) if _block_index(n) is not None)
    stem = set(names[:first_block])
    embed_names = {n for n, p in model.named_parameters() if id(p) in embedding_ids}

    def layer_id(name: str) -> int:
        block = _block_index(name)
        if block is not None:
            return block + 1
        if name in stem or name in embed_names or _EMBED_HINT.search(name):
            return 0
        return num_blocks + 1

    return layer_id, num_blocks


def _compile(patterns: Iterable[str], what: str) -> list[re.Pattern[str]]:
    if isinstance(patterns, str):
        raise TypeError(f"{what} must be a list of regexes, not a single string; write [{patterns!r}]")
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as err:
            raise ValueError(f"{what} pattern {p!r} is not a valid regex: {err}") from err
    return compiled


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    layer_decay: float | None = None,
    no_decay: Sequence[str] | None = None,
    layer_id: Callable[[str], int] | None = None,
    lr_multipliers: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into optimizer param groups.

    Args:
        model: the module whose ``requires_grad`` parameters are grouped (frozen ones are left out).
        lr: base learning rate; each group's ``lr`` is ``lr * lr_scale``.
        weight_decay: decay for the parameters that are decayed.
        layer_decay: timm's layer-wise LR decay ``d`` in (0, 1]: a parameter of layer ``k`` of
            ``L + 2`` layers gets ``lr_scale = d ** (L + 1 - k)``. ``None`` disables it.
        no_decay: name regexes (``re.search``) of parameters without weight decay; replaces the
            default: every parameter with ``ndim <= 1``, every ``nn.Embedding`` weight, and the
            names that ``no_weight_decay()`` of the model or of any submodule returns (timm's
            convention for ``pos_embed``/``cls_token``).
        layer_id: callable ``name -> layer index`` that overrides the inferred layer ids (only with
            ``layer_decay``).
        lr_multipliers: name regex -> factor applied on top of ``lr_scale``; the first pattern
            (in mapping order) that matches a name wins.

    Returns:
        Groups ``{"params", "param_names", "lr", "lr_scale", "weight_decay"}``; parameters with
        equal settings share a group, and every trainable parameter is in exactly one.

    Raises:
        ValueError: no trainable parameters; ``layer_decay`` outside (0, 1]; ``layer_id`` without
            ``layer_decay``; a ``no_decay`` or
            ``lr_multipliers`` pattern that matches no trainable parameter; a negative multiplier.

    Example:
        >>> groups = param_groups(gpt, lr=3e-4, weight_decay=0.1, layer_decay=0.8)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups needs an nn.Module, got {type(model).__name__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (all are frozen or there are none)")
    if layer_decay is not None and not (
        isinstance(layer_decay, (int, float)) and math.isfinite(layer_decay) and 0 < layer_decay <= 1
    ):
        raise ValueError(f"layer_decay={layer_decay!r} is invalid; it must lie in (0, 1]")

    if no_decay is None:
        embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
        # timm's no_weight_decay() on the model or on any submodule (a LightningModule usually
        # wraps the timm model: self.model.pos_embed), names taken relative to that submodule
        skip = {
            f"{prefix}.{n}" if prefix else n
            for prefix, module in model.named_modules()
            if callable(getattr(module, "no_weight_decay", None))
            for n in module.no_weight_decay()
        }

        def decays(name: str, p: torch.Tensor) -> bool:
            return p.ndim > 1 and id(p) not in embedding_ids and name not in skip

    else:
        patterns = _compile(no_decay, "no_decay")
        unmatched = [p.pattern for p in patterns if not any(p.search(n) for n, _ in named)]
        if unmatched:
            raise ValueError(f"no_decay pattern(s) {unmatched} match no trainable parameter of {type(model).__name__}")

        def decays(name: str, p: torch.Tensor) -> bool:
            return not any(pat.search(name) for pat in patterns)

    multipliers: list[tuple[re.Pattern[str], float]] = []
    if lr_multipliers:
        for pattern, factor in zip(_compile(lr_multipliers, "lr_multipliers"), lr_multipliers.values()):
            if not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor < 0:
                raise ValueError(f"lr_multipliers[{pattern.pattern!r}]={factor!r} is invalid; it must be a finite number >= 0")
            if not any(pattern.search(n) for n, _ in named):
                raise ValueError(f"lr_multipliers pattern {pattern.pattern!r} matches no trainable parameter of {type(model).__name__}")
            multipliers.append((pattern, float(factor)))

    if layer_id is not None and layer_decay is None:
        raise ValueError("layer_id is used only with layer_decay; pass layer_decay=d in (0, 1] too")
    scale_of: Callable[[str], float] = lambda name: 1.0  # noqa: E731
    if layer_decay is not None:
        if layer_id is None:
            layer_id, num_blocks = infer_layer_id(model)
        else:
            num_blocks = max(layer_id(n) for n, _ in named) - 1
        top = num_blocks + 1
        scale_of = lambda name: float(layer_decay) ** (top - layer_id(name))  # noqa: E731

    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, p in named:
        scale = scale_of(name)
        for pattern, factor in multipliers:
            if pattern.search(name):
                scale *= factor
                break
        wd = float(weight_decay) if decays(name, p) else 0.0
        group = groups.setdefault(
            (wd, scale),
            {"params": [], "param_names": [], "lr": lr * scale, "lr_scale": scale, "weight_decay": wd},
        )
        group["params"].append(p)
        group["param_names"].append(name)
    return list(groups.values())
