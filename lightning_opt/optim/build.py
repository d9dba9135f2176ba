"""``build_optimizer``: a registry name plus a model (or ready param groups) to an optimizer."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_opt.optim.param_groups import mup_rule_for, param_groups
from lightning_opt.optim.registry import OptimInfo, accepted_hparams, validate_hparams

__all__ = ["build_optimizer", "check_buildable", "normalize_groups"]


def normalize_groups(params: Iterable[Any], *, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Turn tensors, ``(name, tensor)`` pairs or group dicts into group dicts with ``lr_scale``.

    A group without ``lr`` gets ``lr * lr_scale``; one without ``weight_decay`` gets ``weight_decay``.
    """
    items = list(params)
    if not items:
        raise ValueError("build_optimizer got an empty parameter list; nothing would be trained")
    if all(isinstance(x, dict) for x in items):
        groups = []
        for g in items:
            if "params" not in g:
                raise ValueError(f"param group {sorted(g)} has no 'params'")
            g = dict(g)
            ps = g["params"]
            g["params"] = [ps] if isinstance(ps, torch.Tensor) else list(ps)
            scale = float(g.setdefault("lr_scale", 1.0))
            g.setdefault("lr", lr * scale)
            g.setdefault("weight_decay", weight_decay)
            groups.append(g)
        return groups
    if all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in items):
        return [{"params": [p for _, p in items], "param_names": [n for n, _ in items], "lr": lr, "lr_scale": 1.0, "weight_decay": weight_decay}]
    if all(isinstance(x, torch.Tensor) for x in items):
        return [{"params": items, "lr": lr, "lr_scale": 1.0, "weight_decay": weight_decay}]
    raise TypeError("build_optimizer takes an nn.Module, or an iterable of tensors, (name, tensor) pairs or param-group dicts")


def check_buildable(
    name: str, *, lr: float, weight_decay: float = 0.0, hparams: Mapping[str, Any] | None = None
) -> OptimInfo:
    """Check an optimizer request without a model: build it once over a 2x2 stand-in parameter.

    :func:`~lightning_opt.optim.registry.validate_hparams` checks what the registry knows (names,
    lr, betas, flags); building the class runs its own checks too (SOAP's
    ``precondition_frequency``, Muon's ``ns_steps``), so a config fails when it is made, not at
    fit start. A missing optional dependency is left to the real build (it says what to install).

    Raises:
        ValueError, TypeError: what the registry or the class refuses.
    """
    info, _ = validate_hparams(name, lr=lr, weight_decay=weight_decay, hparams=hparams)
    stand_in = {"params": [nn.Parameter(torch.zeros(2, 2))], "param_names": ["stand_in.weight"]}
    with warnings.catch_warnings():  # "no 2-D hidden matrix", "wd=0 groups not adapted": the stand-in's
        warnings.simplefilter("ignore")
        try:
            build_optimizer([stand_in], name, lr=lr, weight_decay=weight_decay, **dict(hparams or {}))
        except ImportError:
            pass
    return info


def build_optimizer(
    model_or_groups: nn.Module | Iterable[Any],
    name: str,
    *,
    lr: float,
    weight_decay: float = 0.0,
    layer_decay: float | None = None,
    no_decay: Sequence[str] | None = None,
    layer_id: Callable[[str], int] | None = None,
    lr_multipliers: Mapping[str, float] | None = None,
    mup_base_width: int | None = None,
    mup_width: int | None = None,
    mup_base_model: nn.Module | Mapping[str, Sequence[int]] | None = None,
    mup_base_shapes: Mapping[str, Sequence[int | None]] | None = None,
    **hparams: Any,
) -> Optimizer:
    """Build the optimizer registered as ``name`` over a model's parameters.

    Args:
        model_or_groups: an ``nn.Module`` (grouped with :func:`param_groups`) or ready param groups.
        name: a registry name (``available_optimizers()``), a Hugging Face ``optim`` string or a
            DeepSpeed ``optimizer.type``; case-insensitive.
        lr: base learning rate (each group gets ``lr * lr_scale``).
        weight_decay: weight decay of the decayed groups (see :func:`param_groups`).
        layer_decay, no_decay, layer_id, lr_multipliers: grouping options, only with a model.
        mup_base_width, mup_width, mup_base_model, mup_base_shapes: μP learning rates (see
            :func:`param_groups`), with the μP rule of ``name`` (Adam- or SGD-like, ``MUP_RULES``).
        **hparams: the algorithm's own hyperparameters (``betas``, ``momentum``, ...).

    Raises:
        ValueError: unknown name (with the closest names), invalid lr/betas/layer_decay, patterns
            that match nothing, no trainable parameters.
        TypeError: a hyperparameter the algorithm does not take.

    Example:
        >>> opt = build_optimizer(model, "adamw", lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
    """
    info, kwargs = validate_hparams(name, lr=lr, weight_decay=weight_decay, hparams=hparams)
    mup = {"mup_base_width": mup_base_width, "mup_width": mup_width, "mup_base_model": mup_base_model, "mup_base_shapes": mup_base_shapes}
    use_mup = any(v is not None for v in mup.values())
    if isinstance(model_or_groups, nn.Module):
        groups = param_groups(
            model_or_groups,
            lr=lr,
            weight_decay=weight_decay,
            layer_decay=layer_decay,
            no_decay=no_decay,
            layer_id=layer_id,
            lr_multipliers=lr_multipliers,
            mup_rule=mup_rule_for(info.name) if use_mup else None,
            **mup,
        )
    else:
        given = [k for k, v in {"layer_decay": layer_decay, "no_decay": no_decay, "layer_id": layer_id, "lr_multipliers": lr_multipliers, **mup}.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} need an nn.Module to group; pass the model, not param groups")
        groups = normalize_groups(model_or_groups, lr=lr, weight_decay=weight_decay)
    if "weight_decay" in accepted_hparams(info) or "weight_decay" in info.fixed:
        kwargs.setdefault("weight_decay", weight_decay)
    elif any(g.get("weight_decay", 0.0) for g in groups):
        raise TypeError(f"{info.name} takes no weight decay, but a param group sets one")
    return info.cls(groups, lr=lr, **kwargs)
