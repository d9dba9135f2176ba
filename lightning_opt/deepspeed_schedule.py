"""Translate a DeepSpeed ``scheduler`` block into the equivalent :class:`LRSchedule`.

DeepSpeed is not needed: only its config format and formulas (``deepspeed/runtime/lr_schedules.py``)
are reproduced. Supported types and their params (DeepSpeed's defaults):

- ``WarmupLR``: ``warmup_min_lr`` (0), ``warmup_max_lr`` (the optimizer's lr),
  ``warmup_num_steps`` (1000), ``warmup_type`` (``"log"``); then constant.
- ``WarmupDecayLR``: the same plus ``total_num_steps`` (required), ``warmup_max_lr`` (0.001); then a
  linear decay to ``warmup_min_lr`` at ``total_num_steps``.
- ``WarmupCosineLR``: ``total_num_steps`` (required), ``warmup_min_ratio`` (0), ``warmup_num_steps``
  (1000), ``cos_min_ratio`` (1e-4; ``cosine_min_ratio`` is accepted as a synonym), ``warmup_type``
  (``"log"``); a cosine to ``cos_min_ratio`` of the optimizer's lr.

Differences from DeepSpeed, on purpose:

- ``LRSchedule`` multiplies each param group's own lr. ``WarmupLR``/``WarmupDecayLR`` set absolute
  lrs, the same for every group; here they become ratios of ``warmup_max_lr``, so the optimizer's
  lr must be ``warmup_max_lr`` (checked when ``optimizer_lr`` is given) and per-group ratios survive.
- Indexing: the value DeepSpeed computes at ``last_batch_iteration = t`` is used for optimizer step
  ``t`` (the convention of every schedule here). DeepSpeed's engine steps its scheduler after each
  optimizer step, so in a DeepSpeed run the first two steps both use the initial value and every
  later value comes one step late.
- DeepSpeed runs a warmup of at least 2 steps (``max(2, warmup_num_steps)``); so does the
  translation, and ``WarmupCosineLR``'s cosine starts one step in (``decay_offset=1``), as DeepSpeed's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_opt.callbacks.lr_schedule import LRSchedule

__all__ = ["lr_schedule_from_deepspeed"]

_PARAMS: dict[str, dict[str, Any]] = {
    "WarmupLR": {"warmup_min_lr": 0.0, "warmup_max_lr": None, "warmup_num_steps": 1000, "warmup_type": "log"},
    "WarmupDecayLR": {
        "total_num_steps": None,
        "warmup_min_lr": 0.0,
        "warmup_max_lr": 0.001,
        "warmup_num_steps": 1000,
        "warmup_type": "log",
    },
    "WarmupCosineLR": {
        "total_num_steps": None,
        "warmup_min_ratio": 0.0,
        "warmup_num_steps": 1000,
        "cos_min_ratio": 0.0001,
        "warmup_type": "log",
    },
}


def lr_schedule_from_deepspeed(
    scheduler: Mapping[str, Any], *, optimizer_lr: float | None = None, **auto: Any
) -> LRSchedule:
    """The :class:`LRSchedule` equivalent to a DeepSpeed ``scheduler`` block.

    Args:
        scheduler: ``{"type": "WarmupCosineLR", "params": {...}}`` (the ``scheduler`` block).
        optimizer_lr: the optimizer's lr, to check ``warmup_max_lr`` against it and to fill
            ``WarmupLR``'s default ``warmup_max_lr`` (default None: not checked).
        **auto: values for ``"auto"`` params, by key (``total_num_steps=...``, ``warmup_num_steps=...``);
            other keys (``lr``, ``weight_decay`` for the optimizer block) are ignored here.
            ``total_num_steps=None`` takes the run length from the trainer.

    Raises:
        ValueError: unknown type (the supported ones are listed), an ``"auto"`` param without a
            value, a param the type does not take, ``total_num_steps`` missing,
            ``warmup_max_lr`` different from ``optimizer_lr``, or an impossible schedule.

    Example:
        >>> cb = lr_schedule_from_deepspeed(
        ...     {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto", "warmup_num_steps": 100}},
        ...     total_num_steps=10_000,
        ... )
    """
    kind = scheduler.get("type")
    if kind not in _PARAMS:
        raise ValueError(f"DeepSpeed scheduler type {kind!r} is not supported; supported: {', '.join(_PARAMS)}")
    given = dict(scheduler.get("params") or {})
    if kind == "WarmupCosineLR" and "cosine_min_ratio" in given:
        if "cos_min_ratio" in given:
            raise ValueError("DeepSpeed WarmupCosineLR params give both cos_min_ratio and cosine_min_ratio; keep one")
        given["cos_min_ratio"] = given.pop("cosine_min_ratio")
    unknown = sorted(set(given) - set(_PARAMS[kind]))
    if unknown:
        raise ValueError(f"DeepSpeed {kind} takes no {', '.join(unknown)}; it takes: {', '.join(_PARAMS[kind])}")
    params: dict[str, Any] = {}
    for key, default in _PARAMS[kind].items():
        value = given.get(key, default)
        if isinstance(value, str) and value == "auto":
            if key not in auto or (auto[key] is None and key != "total_num_steps"):
                raise ValueError(f'DeepSpeed scheduler.params.{key} is "auto" but no value was given; pass {key}=...')
            value = auto[key]
        params[key] = value
    if kind != "WarmupLR" and "total_num_steps" not in given:
        raise ValueError(f'DeepSpeed {kind} needs params.total_num_steps (a number or "auto")')
    warmup_type = params["warmup_type"]
    if warmup_type not in ("log", "linear"):
        raise ValueError(
            f"DeepSpeed scheduler.params.warmup_type={warmup_type!r} is invalid; expected 'log' or 'linear'"
        )
    warmup = params["warmup_num_steps"]
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup <= 0:
        raise ValueError(
            f"DeepSpeed scheduler.params.warmup_num_steps={warmup!r} is invalid; expected a positive integer"
        )
    common = {"warmup_steps": max(2, warmup), "warmup_type": warmup_type}
    total = params.get("total_num_steps")

    if kind == "WarmupCosineLR":
        return LRSchedule(
            "cosine",
            **common,
            total_steps=total,
            warmup_init_ratio=float(params["warmup_min_ratio"]),
            min_lr_ratio=float(params["cos_min_ratio"]),
            decay_offset=1,
        )

    max_lr = params["warmup_max_lr"]
    if max_lr is None:
        max_lr = optimizer_lr
    if max_lr is not None and optimizer_lr is not None and abs(max_lr - optimizer_lr) > 1e-12 * abs(optimizer_lr):
        raise ValueError(
            f"DeepSpeed {kind} warms up to warmup_max_lr={max_lr}, but the optimizer's lr is {optimizer_lr}; "
            "LRSchedule multiplies the optimizer's lr, so set the optimizer's lr to warmup_max_lr"
        )
    min_lr = float(params["warmup_min_lr"])
    if min_lr == 0.0:
        ratio = 0.0
    elif max_lr is None:
        raise ValueError(
            f"DeepSpeed {kind} with warmup_min_lr={min_lr} needs warmup_max_lr or optimizer_lr to form the ratio"
        )
    else:
        ratio = min_lr / float(max_lr)
    if kind == "WarmupLR":
        return LRSchedule("constant", **common, warmup_init_ratio=ratio)
    return LRSchedule("linear", **common, total_steps=total, warmup_init_ratio=ratio, min_lr_ratio=ratio)
