"""Training-loop callbacks (``lightning_opt.callbacks.X`` works as a LightningCLI ``class_path``).

Each callback lives in its own snake_case module and is imported on first use, so importing
this package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LRSchedule": "lr_schedule",
    "GradientMonitor": "gradient_monitor",
    "SpikeGuard": "spike_guard",
    "ScheduleFreeMode": "schedule_free_mode",
    "SophiaHessian": "sophia_hessian",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
