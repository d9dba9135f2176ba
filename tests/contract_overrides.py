"""Per-optimizer settings for the contract suite (tests/test_contract.py).

One entry per registry name that needs something other than the defaults; each key is explained
where it is read. Keep entries minimal and say why in a comment.
"""

from __future__ import annotations

from typing import Any

OVERRIDES: dict[str, dict[str, Any]] = {
    # "name": {"lr": 1e-2, "hparams": {...}, "loss_threshold": 0.1, "steps": 60, "bf16": True},
}
