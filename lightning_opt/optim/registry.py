"""The optimizer registry: every algorithm is one :class:`OptimInfo` record, looked up by name.

Names are matched case-insensitively, so Hugging Face ``TrainingArguments.optim`` strings
(``adamw_torch_fused``) and DeepSpeed ``optimizer.type`` values (``MuonOptimizer``) resolve through
the same table as our own names. An alias may fix keyword arguments (``adamw_torch_fused`` is
``adamw`` with ``fused=True``); the user cannot override a fixed argument.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch.optim import Optimizer

from lightning_opt.optim.base import check_lr_wd, check_options

__all__ = [
    "Alias",
    "OptimInfo",
    "accepted_hparams",
    "aliases",
    "available_optimizers",
    "get_optimizer_info",
    "make_callbacks",
    "register",
    "register_alias",
    "resolve",
    "validate_hparams",
]

# arguments that every torch optimizer takes for implementation choice, never for the math
_IMPL_ARGS = ("foreach", "fused", "capturable", "differentiable")


@dataclass(frozen=True)
class OptimInfo:
    """One registered optimizer.

    Args:
        name: registry name (lower-case snake_case), e.g. ``"adamw"``.
        cls: the optimizer class (or a factory) called as ``cls(param_groups, lr=..., **hparams)``.
        description: one line shown in docs and ``lightning-opt list``.
        paper: citation of the algorithm's paper (arXiv id or venue).
        default_lr: the learning rate used when the user gives none (the paper's or torch's default).
        fixed: keyword arguments this name fixes (``sgd_nesterov`` fixes ``nesterov=True``).
        defaults: keyword arguments this name passes unless the user gives them (``sgd_nesterov``'s
            ``momentum=0.9``, where the class's own default is 0).
        hparams: the hyperparameters the user may pass; ``None`` reads them from ``cls``'s signature.
        extra: the pip extra that provides a dependency (``"bnb"``), named in errors.
        callbacks: the callbacks the algorithm needs in a Trainer (schedule-free's train/eval
            switch, Sophia's Hessian refresh), named by import path ``"module:Class"``; the mixin
            imports and builds them (:func:`make_callbacks`), so the optimizer modules never import
            the callbacks package.
        schedule_free: the optimizer keeps train/eval parameter sequences (``optimizer.train()``).
    """

    name: str
    cls: Callable[..., Optimizer]
    description: str
    paper: str = ""
    default_lr: float = 1e-3
    fixed: Mapping[str, Any] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    hparams: tuple[str, ...] | None = None
    extra: str | None = None
    callbacks: tuple[str, ...] = ()
    schedule_free: bool = False

    def __post_init__(self) -> None:
        if self.name != self.name.lower() or not self.name.replace("_", "").isalnum():
            raise ValueError(f"OptimInfo(name={self.name!r}) must be lower-case snake_case")
        object.__setattr__(self, "fixed", MappingProxyType(dict(self.fixed)))
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        for path in self.callbacks:
            if not isinstance(path, str) or path.count(":") != 1:
                raise ValueError(f"OptimInfo(callbacks=[..., {path!r}]) must name callbacks as 'module:Class'")


@dataclass(frozen=True)
class Alias:
    """A name from another library that resolves to a registry entry, possibly fixing arguments."""

    name: str
    target: str
    source: str
    fixed: Mapping[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, OptimInfo] = {}
_ALIASES: dict[str, Alias] = {}


def register(info: OptimInfo) -> OptimInfo:
    """Add ``info`` to the registry; a name may be registered once."""
    key = info.name.lower()
    if key in _REGISTRY or key in _ALIASES:
        raise ValueError(f"optimizer name {info.name!r} is already registered")
    _REGISTRY[key] = info
    return info


def register_alias(name: str, target: str, *, source: str, **fixed: Any) -> Alias:
    """Make ``name`` (from ``source``: ``"huggingface"``, ``"deepspeed"``, ...) resolve to ``target``.

    Raises:
        ValueError: ``target`` is not registered, or ``name`` is taken.
    """
    key = name.lower()
    if target not in _REGISTRY:
        raise ValueError(f"alias {name!r} points to unregistered optimizer {target!r}")
    existing = _ALIASES.get(key)
    if key in _REGISTRY or (existing is not None and (existing.target, dict(existing.fixed)) != (target, fixed)):
        raise ValueError(f"optimizer name {name!r} is already registered")
    unknown = set(fixed) - set(accepted_hparams(_REGISTRY[target]))
    if unknown:
        raise ValueError(f"alias {name!r} fixes {sorted(unknown)}, which {target!r} does not take")
    alias = Alias(name=name, target=target, source=source, fixed=MappingProxyType(dict(fixed)))
    _ALIASES[key] = alias
    return alias


def _ensure_loaded() -> None:
    # the families register themselves on import; importing lightning_opt.optim loads them all
    import lightning_opt.optim  # noqa: F401


def available_optimizers() -> list[str]:
    """Every registered optimizer name, sorted (aliases are not listed; see :func:`aliases`)."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def aliases(source: str | None = None) -> dict[str, Alias]:
    """The alias table, optionally only the names that come from ``source``."""
    _ensure_loaded()
    return {a.name: a for a in _ALIASES.values() if source is None or a.source == source}


def resolve(name: str) -> tuple[OptimInfo, dict[str, Any]]:
    """Look ``name`` up; return the entry and the keyword arguments the name fixes.

    Raises:
        ValueError: unknown name, with the closest registered names.
    """
    _ensure_loaded()
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key in _REGISTRY:
        info = _REGISTRY[key]
        return info, dict(info.fixed)
    if key in _ALIASES:
        alias = _ALIASES[key]
        info = _REGISTRY[alias.target]
        return info, {**info.fixed, **alias.fixed}
    known = sorted(_REGISTRY) + sorted(a.name for a in _ALIASES.values())
    close = difflib.get_close_matches(key, [k.lower() for k in known], n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise ValueError(f"unknown optimizer {name!r}; {hint}registered: {', '.join(sorted(_REGISTRY))}")


def make_callbacks(info: OptimInfo) -> list[Any]:
    """A fresh instance of every callback ``info`` needs (imported by path, built without arguments)."""
    out = []
    for path in info.callbacks:
        module, _, attr = path.partition(":")
        out.append(getattr(importlib.import_module(module), attr)())
    return out


def get_optimizer_info(name: str) -> OptimInfo:
    """The :class:`OptimInfo` behind ``name`` (a registry name or an alias)."""
    return resolve(name)[0]


def accepted_hparams(info: OptimInfo) -> tuple[str, ...]:
    """The keyword arguments ``info.cls`` takes besides ``params``, minus those its name fixes."""
    if info.hparams is not None:
        names = info.hparams
    else:
        sig = inspect.signature(info.cls)
        names = tuple(
            p.name
            for p in sig.parameters.values()
            if p.name != "params" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        )
    return tuple(n for n in names if n not in info.fixed)


def validate_hparams(
    name: str,
    *,
    lr: float,
    weight_decay: float = 0.0,
    hparams: Mapping[str, Any] | None = None,
) -> tuple[OptimInfo, dict[str, Any]]:
    """Check everything about an optimizer request that can be checked without a model.

    Returns:
        The entry and the full keyword arguments to pass to its class (fixed ones included).

    Raises:
        ValueError: unknown name, negative or non-finite ``lr``/``weight_decay``/``eps``, betas
            or momentum outside [0, 1), any NaN hyperparameter, a non-bool value for a flag.
        TypeError: a hyperparameter the algorithm does not take (the message lists those it does),
            or one that its name fixes.
    """
    info, fixed = resolve(name)
    hparams = dict(hparams or {})
    accepted = accepted_hparams(info)
    for key in hparams:
        if key in fixed:
            raise TypeError(f"{name} fixes {key}={fixed[key]!r}; do not pass {key!r} (use {info.name!r} to choose it)")
        if key not in accepted or key in ("lr", "weight_decay"):
            takes = ", ".join(n for n in accepted if n not in _IMPL_ARGS)
            raise TypeError(f"{name} takes no {key!r}; it takes: {takes}")
    check_lr_wd(name, lr, weight_decay)
    if weight_decay and "weight_decay" not in accepted:
        raise TypeError(f"{name} takes no 'weight_decay'; set weight_decay=0")
    # the same checks the class applies to its defaults and to each param group's own options
    # (impl is left to the class, whose message says more: "torch's AdamW has no Triton kernel")
    hparams = check_options(
        name, hparams, defaults=_signature_defaults(info), checks=getattr(info.cls, "option_checks", None)
    )
    kwargs = {**info.defaults, **fixed, **hparams}
    return info, kwargs


def _signature_defaults(info: OptimInfo) -> dict[str, Any]:
    """The defaults of ``info.cls``'s signature: a bool default makes a key a flag (a YAML "false"
    string must not pass as truthy), a ``betas`` default fixes how many betas there are."""
    try:
        sig = inspect.signature(info.cls)
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in sig.parameters.values() if p.default is not p.empty}
