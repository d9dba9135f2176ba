"""Read a DeepSpeed JSON config and build the same optimizer (and LR schedule) with lightning_opt.

DeepSpeed is not needed: only its config format is read. ``optimizer.params`` keys are the
algorithm's own, plus these spellings users' DeepSpeed configs carry, translated (:data:`TRANSLATED_KEYS`):

=======================================  ==========================================================
DeepSpeed ``optimizer.params``           becomes
=======================================  ==========================================================
``beta1``, ``beta2``                     ``betas=(beta1, beta2)`` where the algorithm takes
                                         ``betas`` (Lion, Sophia, AdamW, ...; a missing one takes
                                         the algorithm's default); kept as is where it takes
                                         ``beta1``/``beta2`` (Adafactor)
``eps1``, ``eps2``                       ``eps=(eps1, eps2)`` where ``eps`` is a pair (Adafactor)
``cliping_threshold`` (DeepSpeed's       ``clip_threshold`` (Adafactor)
spelling), ``clipping_threshold``
``muon_lr`` (``Muon``/``MuonOptimizer``) the Muon side's lr (overrides ``lr`` there)
``adam_lr`` (``Muon``/``MuonOptimizer``) the AdamW side's lr, ``adamw_lr`` (overrides ``lr`` there)
``lr`` (``Muon``/``MuonOptimizer``)      both sides, as DeepSpeed's engine (not our Muon's
                                         ``0.015 x lr`` AdamW side); without ``lr``, Keller's
                                         ``0.02`` and ``3e-4``
``betas``, ``eps`` (``Muon``)            the AdamW side's ``adamw_betas``, ``adamw_eps``
``adam_w_mode`` (``Adam``)               ``Adam`` is AdamW unless it is ``false`` (a JSON bool)
``torch_adam``, ``fused``                implementation switches of DeepSpeed: checked, dropped
=======================================  ==========================================================

Flags must be JSON booleans: ``"adam_w_mode": "false"`` (a string) is an error, not ``True``.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lightning_opt.optim.base import check_flag
from lightning_opt.optim.build import build_optimizer
from lightning_opt.optim.registry import OptimInfo, accepted_hparams, get_optimizer_info

__all__ = ["TRANSLATED_KEYS", "fill_auto", "from_deepspeed_config", "load_deepspeed_config", "translate_params"]

# DeepSpeed-only switches that choose an implementation, never the math
_IMPLEMENTATION_KEYS = ("torch_adam", "fused")
#: DeepSpeed's names for Muon (its engine's semantics, see :func:`translate_params`)
_MUON_TYPES = ("muon", "muonoptimizer")
# MuonWithAuxAdam's defaults (Keller Jordan's; DeepSpeed builds it): Muon lr, Adam-side lr
_KELLER_MUON_LR, _KELLER_ADAM_LR = 0.02, 3e-4

#: DeepSpeed ``optimizer.params`` spellings -> ours (the table in this module's docstring and README)
TRANSLATED_KEYS: dict[str, str] = {
    "beta1": "betas[0] (where the algorithm takes betas)",
    "beta2": "betas[1] (where the algorithm takes betas)",
    "eps1": "eps[0] (where eps is a pair: Adafactor)",
    "eps2": "eps[1] (where eps is a pair: Adafactor)",
    "cliping_threshold": "clip_threshold",
    "clipping_threshold": "clip_threshold",
    "muon_lr": "Muon: the Muon side's lr",
    "adam_lr": "Muon: adamw_lr (the AdamW side's lr)",
}


def _default(info: OptimInfo, key: str) -> Any:
    try:
        param = inspect.signature(info.cls).parameters.get(key)
    except (TypeError, ValueError):
        return None
    return None if param is None or param.default is param.empty else param.default


def _pair(params: dict[str, Any], info: OptimInfo, first: str, second: str, into: str, kind: str) -> None:
    if first not in params and second not in params:
        return
    if into in params:
        raise ValueError(f"DeepSpeed {kind} params give both {into!r} and {first!r}/{second!r}; keep one")
    default = _default(info, into)
    if not isinstance(default, (tuple, list)) or len(default) != 2:
        return  # not a pair here: the keys stay and the algorithm judges them
    params[into] = (params.pop(first, default[0]), params.pop(second, default[1]))


def translate_params(kind: str, params: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The registry name and keyword arguments for DeepSpeed's ``optimizer.type`` and ``params``.

    Applies :data:`TRANSLATED_KEYS` (see the module docstring). ``Muon``/``MuonOptimizer`` follow
    DeepSpeed's engine: ``lr`` for both sides, ``muon_lr``/``adam_lr`` override one side, ``betas``
    and ``eps`` are the AdamW side's; ``momentum``, ``weight_decay`` and our Muon's own options pass.

    Raises:
        ValueError: a flag that is not a JSON boolean, or a value given under two spellings.
        TypeError: ``adam_w_mode`` for a type other than Adam/AdamW.
    """
    params = dict(params)
    name = str(kind)
    mode_given = "adam_w_mode" in params
    # DeepSpeed's engine: Adam is AdamW unless adam_w_mode is false; AdamW is AdamW either way
    adam_w_mode = check_flag(f"DeepSpeed {kind}", "adam_w_mode", params.pop("adam_w_mode", True))
    if name.lower() == "adam":
        name = "adamw" if adam_w_mode else "adam"
    elif mode_given and name.lower() != "adamw":
        raise TypeError(f"DeepSpeed optimizer {kind!r} takes no 'adam_w_mode'")
    for key in _IMPLEMENTATION_KEYS:
        if key in params:
            check_flag(f"DeepSpeed {kind}", key, params.pop(key))
    info = get_optimizer_info(name)
    if name.lower() in _MUON_TYPES:
        lr, muon_lr, adam_lr = params.pop("lr", None), params.pop("muon_lr", None), params.pop("adam_lr", None)
        params["lr"] = muon_lr if muon_lr is not None else lr if lr is not None else _KELLER_MUON_LR
        params["adamw_lr"] = adam_lr if adam_lr is not None else lr if lr is not None else _KELLER_ADAM_LR
        for ours, theirs in (("adamw_betas", "betas"), ("adamw_eps", "eps")):
            if theirs in params:
                params[ours] = params.pop(theirs)
        return name, params
    accepted = accepted_hparams(info)
    if "betas" in accepted and "beta1" not in accepted:
        _pair(params, info, "beta1", "beta2", "betas", kind)
    if "eps" in accepted:
        _pair(params, info, "eps1", "eps2", "eps", kind)
    if "clip_threshold" in accepted:
        given = [k for k in ("cliping_threshold", "clipping_threshold", "clip_threshold") if k in params]
        if len(given) > 1:
            raise ValueError(f"DeepSpeed {kind} params give {given}; keep one")
        if given:
            params["clip_threshold"] = params.pop(given[0])
    if isinstance(params.get("betas"), list):
        params["betas"] = tuple(params["betas"])
    return name, params


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
    with_schedule: bool | None = None,
    **auto: Any,
) -> Optimizer | tuple[Optimizer, Any]:
    """Build the optimizer a DeepSpeed config describes, over ``model``.

    ``optimizer.type`` is resolved through the registry's DeepSpeed aliases (case-insensitive:
    ``AdamW``, ``Lamb``, ``LionOptimizer``, ``SophiaOptimizer``, ``AdaFactorOptimizer``,
    ``MuonOptimizer``, ...). DeepSpeed's ``Adam`` is AdamW unless ``"adam_w_mode": false`` (its
    default is true); ``torch_adam``/``fused`` only pick an implementation and are dropped. The
    spellings of the module docstring's table are translated (``beta1``/``beta2``, ``eps1``/``eps2``,
    ``cliping_threshold``, Muon's ``muon_lr``/``adam_lr``); every other param must be one the
    algorithm takes. Weight decay follows our default grouping (no decay for biases, norms and
    embeddings), as Hugging Face's Trainer does.

    Args:
        config: path to the JSON file, or the config dict (the whole config or its optimizer block).
        model: the module to optimize.
        with_schedule: ``True``: also translate the ``scheduler`` block (``WarmupLR``,
            ``WarmupDecayLR``, ``WarmupCosineLR``) into an ``LRSchedule`` callback and return
            ``(optimizer, schedule)`` (``schedule`` is ``None`` without a scheduler block).
            ``False``: return the optimizer and leave a scheduler block out, on purpose. ``None``
            (default): the optimizer, and a config with a scheduler block is an error (it is never
            dropped silently).
        **auto: values for ``"auto"`` entries, by key (``lr=3e-4, weight_decay=0.1, total_num_steps=...``);
            a key with no ``"auto"`` entry is an error (an explicit config value is never overridden).

    Raises:
        ValueError: an ``"auto"`` value with no value given; unknown optimizer type; a flag that is
            not a JSON boolean; a scheduler block with ``with_schedule`` left at ``None``.
        TypeError: a param the algorithm does not take; a keyword with no ``"auto"`` entry.

    Example:
        >>> # ds_config.json: {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto"}}}
        >>> opt = from_deepspeed_config("ds_config.json", model, lr=3e-4, betas=(0.9, 0.95))
    """
    cfg = load_deepspeed_config(config)
    block = _optimizer_block(cfg)
    if with_schedule is None and cfg.get("scheduler") is not None:
        kind = cfg["scheduler"].get("type") if isinstance(cfg["scheduler"], Mapping) else cfg["scheduler"]
        raise ValueError(
            f"the DeepSpeed config has a scheduler block ({kind!r}); pass with_schedule=True to get it as an "
            "LRSchedule callback (returns (optimizer, schedule)), or with_schedule=False to leave it out"
        )
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
    name, params = translate_params(block["type"], params)
    if "lr" not in params:
        params["lr"] = get_optimizer_info(name).default_lr
    optimizer = build_optimizer(model, name, **params)
    if not with_schedule:
        return optimizer
    if scheduler is None:
        return optimizer, None
    from lightning_opt.deepspeed_schedule import lr_schedule_from_deepspeed

    return optimizer, lr_schedule_from_deepspeed(scheduler, optimizer_lr=params["lr"], **auto)
