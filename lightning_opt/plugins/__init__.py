"""Lightning precision plugins: ``Trainer(plugins=[BF16Precision(...)])`` or ``FP8Precision(...)``.

Both are imported lazily so ``import lightning_opt.plugins`` costs nothing until a plugin is used, and
an optional backend (torchao, Transformer Engine) is imported only by the plugin that needs it.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["BF16Precision", "FP8Precision"]

_HOMES = {"BF16Precision": "lightning_opt.plugins.bf16", "FP8Precision": "lightning_opt.plugins.fp8"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'lightning_opt.plugins' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
