"""Optimizers: the registry, param grouping, ``build_optimizer`` and one module per algorithm family.

Every module in this package that is not infrastructure registers its algorithms on import; they
are all imported here, in name order, so the registry is complete once ``lightning_opt.optim`` is.
Family modules must not import optional dependencies (bitsandbytes, triton) at module level.
"""

from __future__ import annotations

import importlib
import pkgutil

from lightning_opt.optim.build import build_optimizer, normalize_groups
from lightning_opt.optim.param_groups import infer_layer_id, param_groups
from lightning_opt.optim.registry import (
    Alias,
    OptimInfo,
    accepted_hparams,
    aliases,
    available_optimizers,
    get_optimizer_info,
    register,
    register_alias,
    resolve,
)

_INFRASTRUCTURE = {"build", "param_groups", "registry", "base", "precision", "engine", "distributed"}

_families = [
    importlib.import_module(f"{__name__}.{m.name}")
    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)
    if m.name not in _INFRASTRUCTURE and not m.name.startswith("_")
]
# wrappers over every other entry (lookahead_<name>) register once all the families have
for _family in _families:
    if hasattr(_family, "register_after_all"):
        _family.register_after_all()

__all__ = [
    "Alias",
    "OptimInfo",
    "accepted_hparams",
    "aliases",
    "available_optimizers",
    "build_optimizer",
    "get_optimizer_info",
    "infer_layer_id",
    "normalize_groups",
    "param_groups",
    "register",
    "register_alias",
    "resolve",
]
