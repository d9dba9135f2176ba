"""Read a DeepSpeed JSON config and build the same optimizer (and LR schedule) with lightning_opt.

DeepSpeed is not needed: only its config format is read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lightning_opt.optim.build import build_optimizer

__all__ = ["fill_auto", "from_deepspeed_config", "load_deepspeed_config"]

# DeepSpeed-only switches that choose an implementation, never the math
_IMPLEMENTATION_KEYS = {"torch_adam", "fused"}


def load_deepspeed_config(config: str | PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """A DeepSpeed config as a dict, from a path to a JSON file or a mapping."""
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {str(path)!r} does not exist")
    with path.open() as f:
        return json.load(f)


def fill_auto(params: Mapping[str, Any], auto: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """Replace every ``"auto"`` value in ``params`` by ``auto[key]``.

    Raises:
        ValueError: a key is ``"auto"`` and ``auto`` has no value for it.
    """
    filled = {}
    for key, value in params.items():
        if isinstance(value, str) and value == "auto":
            if key not in auto or auto[key] is None:
                raise ValueError(
                    f"DeepSpeed {where}.params.{key} is \"auto\" but no value was given; "
                    f"pass {key}=... to from_deepspeed_config"
                )
            value = auto[key]
        filled[key] = value
    return filled


def _auto_keys(block: Mapping[str, Any]) -> set[str]:
    return {k for k, v in block.get("params", {}).items() if isinstance(v, str) and v == "auto"}


def _optimizer_block(config: Mapping[str, Any]) -> Mapping[str, Any]:
    block = config.get("optimizer", config if "type" in config else None)
    if not isinstance(block, Mapping) or "type" not in block:
        raise ValueError("DeepSpeed config has no optimizer block with a 'type' (expected {\"optimizer\": {\"type\": ..., \"params\": {...}}})")
    return block


def from_deepspeed_config(
    config: str | PathLike[str] | Mapping[str, Any],
    model: nn.Module,
    *,
    with_schedule: bool = False,
    **auto: Any,
) -> Optimizer | tuple[Optimizer, Any]:
    """Build the optimizer a DeepSpeed config describes, over ``model``.

    ``optimizer.type`` is resolved through the registry's DeepSpeed aliases (case-insensitive:
    ``AdamW``, ``Lamb``, ``Lion``, ``MuonOptimizer``, ...). DeepSpeed's ``Adam`` is AdamW unless
    ``"adam_w_mode": false`` (its default is true); ``torch_adam`` only picks an implementation and
    is ignored. Every other param must be one the algorithm takes. Weight decay follows our default
    grouping (no decay for biases, norms and embeddings), as Hugging Face's Trainer does.

    Args:
        config: path to the JSON file, or the config dict (the whole config or its optimizer block).
        model: the module to optimize.
        with_schedule: also translate the ``scheduler`` block (``WarmupLR``, ``WarmupDecayLR``,
            ``WarmupCosineLR``) into an ``LRSchedule`` callback and return ``(optimizer, schedule)``
            (``schedule`` is ``None`` without a scheduler block).
        **auto: values for ``"auto"`` entries, by key (``lr=3e-4, weight_decay=0.1, total_num_steps=...``);
            a key with no ``"auto"`` entry is an error (an explicit config value is never overridden).

    Raises:
        ValueError: an ``"auto"`` value with no value given; unknown optimizer type.
        TypeError: a param the algorithm does not take; a keyword with no ``"auto"`` entry.

    Example:
        >>> # ds_config.json: {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto"}}}
        >>> opt = from_deepspeed_config("ds_config.json", model, lr=3e-4, betas=(0.9, 0.95))
    """
    cfg = load_deepspeed_config(config)
    block = _optimizer_block(cfg)
    scheduler = cfg.get("scheduler") if with_schedule else None
    wanted = _auto_keys(block) | (_auto_keys(scheduler) if scheduler is not None else set())
    unused = sorted(set(auto) - wanted)
    if unused:
        where = "" if with_schedule else " (values for the scheduler block need with_schedule=True)"
        raise TypeError(
            f"from_deepspeed_config got {unused}, but the config has no \"auto\" entry for them{where}; "
            f"\"auto\" entries: {sorted(wanted) or 'none'}"
        )
    params = fill_auto(block.get("params", {}), auto, where="optimizer")
    name = str(block["type"])
    adam_w_mode = params.pop("adam_w_mode", True)
    if name.lower() == "adam":
        name = "adamw" if adam_w_mode else "adam"
    elif name.lower() != "adamw" and "adam_w_mode" in block.get("params", {}):
        raise TypeError(f"DeepSpeed optimizer {block['type']!r} takes no 'adam_w_mode'")
    for key in _IMPLEMENTATION_KEYS & set(params):
        params.pop(key)
    if "lr" not in params:
        from lightning_opt.optim.registry import get_optimizer_info

        params["lr"] = get_optimizer_info(name).default_lr
    if isinstance(params.get("betas"), list):
        params["betas"] = tuple(params["betas"])
    optimizer = build_optimizer(model, name, **params)
    if not with_schedule:
        return optimizer
    if scheduler is None:
        return optimizer, None
    from lightning_opt.deepspeed_schedule import lr_schedule_from_deepspeed

    return optimizer, lr_schedule_from_deepspeed(scheduler, optimizer_lr=params["lr"], **auto)
