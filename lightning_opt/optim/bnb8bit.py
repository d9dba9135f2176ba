"""8-bit optimizer states through bitsandbytes: ``adamw_8bit``, ``paged_adamw_8bit``, ``lion_8bit``.

The update math is the 32-bit algorithm; bitsandbytes stores the moments as uint8 codes of a
dynamic (tree) quantization map with one float32 ``absmax`` per block of 256 elements, and
dequantizes, updates and requantizes in one kernel (Dettmers et al. 2021, "8-bit Optimizers via
Block-wise Quantization", arXiv:2110.02861; paged states come from QLoRA, arXiv:2305.14314).
Tensors with fewer than ``min_8bit_size`` elements keep float32 state.

bitsandbytes is optional: nothing here imports it until an optimizer is built, and then a missing
package raises ``ModuleNotFoundError`` naming ``pip install 'lightning-opt[bnb]'``. A bitsandbytes
that cannot run 8-bit optimizers on the parameters' device (CPU before 0.50, a broken native
library) raises ``RuntimeError`` naming the 32-bit fallback (``adamw`` / ``lion``).

Registered names: ``adamw_8bit``, ``paged_adamw_8bit``, ``lion_8bit``, ``paged_lion_8bit`` (all
Hugging Face names too); Hugging Face's
``adamw_bnb_8bit`` resolves to ``adamw_8bit``. The builders return the bitsandbytes optimizer
itself (its ``step``, ``state_dict`` and ``load_state_dict``), so checkpoints are bitsandbytes'.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from torch.optim import Optimizer

from lightning_opt.optim.base import (
    check_arg,
    is_number,
)
from lightning_opt.optim.engine import is_dtensor
from lightning_opt.optim.registry import OptimInfo, register, register_alias

__all__ = ["adamw_8bit", "lion_8bit", "paged_adamw_8bit", "paged_lion_8bit", "require_bnb"]

#: first bitsandbytes release whose 8-bit optimizers run on CPU ("Enable CPU Optimizer Support")
_CPU_MIN_VERSION = (0, 50, 0)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def require_bnb(name: str, fallback: str, params: list[dict[str, Any]] | None = None) -> Any:
    """Import bitsandbytes for optimizer ``name`` and check that it can run on ``params``' devices.

    Args:
        name: the registry name asking (used in messages).
        fallback: the 32-bit registry name to suggest (``"adamw"`` or ``"lion"``).
        params: the param groups that will be optimized (their devices are checked), or ``None``.

    Returns:
        The ``bitsandbytes`` module.

    Raises:
        ModuleNotFoundError: bitsandbytes is not installed.
        RuntimeError: bitsandbytes is installed but cannot run 8-bit optimizers here.
    """
    try:
        import bitsandbytes as bnb
    except ModuleNotFoundError as err:
        if err.name not in (None, "bitsandbytes"):
            raise RuntimeError(
                f"{name} needs bitsandbytes, whose import failed ({err}); fix the installation or use "
                f"the 32-bit {fallback!r} optimizer instead"
            ) from err
        raise ModuleNotFoundError(
            f"{name} needs bitsandbytes: pip install 'lightning-opt[bnb]' (or use the 32-bit {fallback!r})"
        ) from err
    except Exception as err:  # a broken native library raises OSError/RuntimeError on import
        raise RuntimeError(
            f"{name}: bitsandbytes is installed but cannot be imported on this machine ({err}); "
            f"use the 32-bit {fallback!r} optimizer instead"
        ) from err
    if any(is_dtensor(p) for g in params or () for p in g["params"]):
        raise RuntimeError(
            f"{name} cannot step FSDP2 (DTensor) shards: bitsandbytes' 8-bit kernels have no DTensor support, and "
            "its block-wise quantization (blocks of the flattened tensor) would depend on how the rows are sharded, "
            f"so a sharded checkpoint could not be loaded on another number of ranks; use the 32-bit {fallback!r} "
            "under FSDP2 (DDP and single-device runs keep 8-bit states)"
        )
    devices = {p.device.type for g in params or () for p in g["params"]}
    version = getattr(bnb, "__version__", "0")
    if "cpu" in devices and _version_tuple(version) < _CPU_MIN_VERSION:
        raise RuntimeError(
            f"{name}: bitsandbytes {version} cannot run 8-bit optimizers on CPU parameters (CPU support "
            f"starts at bitsandbytes 0.50.0); upgrade with pip install -U 'bitsandbytes>=0.50', move the model "
            f"to a CUDA GPU, or use the 32-bit {fallback!r} optimizer instead"
        )
    return bnb


def _groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    params = list(params)
    if not params:
        raise ValueError("8-bit optimizer got an empty parameter list")
    if isinstance(params[0], dict):
        return params
    return [{"params": params}]


def _validate(
    cls: str, *, lr: float, betas: Any, weight_decay: float, min_8bit_size: int, eps: float | None = None
) -> tuple[float, float]:
    check_arg(cls, "lr", lr, is_number(lr) and lr >= 0, "lr must be a finite number >= 0")
    check_arg(
        cls,
        "weight_decay",
        weight_decay,
        is_number(weight_decay) and weight_decay >= 0,
        "it must be a finite number >= 0",
    )
    ok = isinstance(betas, (tuple, list)) and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas)
    check_arg(cls, "betas", betas, ok, "expected a tuple of 2 floats in [0, 1)")
    if eps is not None:
        check_arg(cls, "eps", eps, is_number(eps) and eps >= 0, "it must be a finite number >= 0")
    ok = isinstance(min_8bit_size, int) and not isinstance(min_8bit_size, bool) and min_8bit_size >= 0
    check_arg(
        cls,
        "min_8bit_size",
        min_8bit_size,
        ok,
        "it must be an int >= 0 (tensors with fewer elements keep 32-bit state)",
    )
    return float(betas[0]), float(betas[1])


def adamw_8bit(
    params: Iterable[Any],
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    *,
    min_8bit_size: int = 4096,
) -> Optimizer:
    """AdamW with block-wise 8-bit moments (``bitsandbytes.optim.AdamW8bit``).

    Args:
        params: parameters or param-group dicts (extra keys such as ``param_names`` pass through).
        lr: learning rate (default ``1e-3``).
        betas: ``(beta1, beta2)`` (default ``(0.9, 0.999)``).
        eps: added to ``sqrt(v_hat)`` (default ``1e-8``).
        weight_decay: decoupled weight decay ``p *= 1 - lr * wd`` (default ``1e-2``).
        min_8bit_size: tensors with fewer elements keep float32 moments (default ``4096``).

    Returns:
        A ``bitsandbytes.optim.AdamW8bit``.

    Raises:
        ValueError: invalid lr, betas, eps, weight_decay or min_8bit_size.
        ModuleNotFoundError: bitsandbytes is not installed.
        RuntimeError: bitsandbytes cannot run 8-bit optimizers on this machine (use ``adamw``).

    Example:
        >>> opt = build_optimizer(model, "adamw_8bit", lr=1e-3, weight_decay=0.1)

    Paper: Dettmers et al., arXiv:2110.02861.
    """
    b1, b2 = _validate(
        "adamw_8bit", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size
    )
    groups = _groups(params)
    bnb = require_bnb("adamw_8bit", "adamw", groups)
    return bnb.optim.AdamW8bit(
        groups, lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size
    )


def paged_adamw_8bit(
    params: Iterable[Any],
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    *,
    min_8bit_size: int = 4096,
) -> Optimizer:
    """AdamW with 8-bit moments in paged (CUDA unified) memory (``bitsandbytes.optim.PagedAdamW8bit``).

    Paging lets the state be evicted to host memory under GPU memory pressure; states of tensors with
    fewer than 1e5 elements are never paged. On CPU bitsandbytes falls back to non-paged state and
    warns once. The arguments and math are those of :func:`adamw_8bit`.

    Raises:
        ValueError: invalid lr, betas, eps, weight_decay or min_8bit_size.
        ModuleNotFoundError: bitsandbytes is not installed.
        RuntimeError: bitsandbytes cannot run 8-bit optimizers on this machine (use ``adamw``).

    Example:
        >>> opt = build_optimizer(model, "paged_adamw_8bit", lr=1e-3)

    Paper: Dettmers et al., arXiv:2110.02861; paging: QLoRA, arXiv:2305.14314.
    """
    b1, b2 = _validate(
        "paged_adamw_8bit", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size
    )
    groups = _groups(params)
    bnb = require_bnb("paged_adamw_8bit", "adamw", groups)
    return bnb.optim.PagedAdamW8bit(
        groups, lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size
    )


def lion_8bit(
    params: Iterable[Any],
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.99),
    weight_decay: float = 0.0,
    *,
    min_8bit_size: int = 4096,
) -> Optimizer:
    """Lion with a block-wise 8-bit momentum (``bitsandbytes.optim.Lion8bit``).

    Args:
        params: parameters or param-group dicts.
        lr: learning rate (default ``1e-4``; 3-10x below AdamW's).
        betas: ``(beta1, beta2)``: update interpolation and momentum decay (default ``(0.9, 0.99)``).
        weight_decay: decoupled weight decay ``p *= 1 - lr * wd`` (default ``0.0``).
        min_8bit_size: tensors with fewer elements keep a float32 momentum (default ``4096``).

    Returns:
        A ``bitsandbytes.optim.Lion8bit``.

    Raises:
        ValueError: invalid lr, betas, weight_decay or min_8bit_size.
        ModuleNotFoundError: bitsandbytes is not installed.
        RuntimeError: bitsandbytes cannot run 8-bit optimizers on this machine (use ``lion``).

    Example:
        >>> opt = build_optimizer(model, "lion_8bit", lr=1e-4, weight_decay=1.0)

    Papers: Chen et al., arXiv:2302.06675 (Lion); Dettmers et al., arXiv:2110.02861 (8-bit states).
    """
    b1, b2 = _validate("lion_8bit", lr=lr, betas=betas, weight_decay=weight_decay, min_8bit_size=min_8bit_size)
    groups = _groups(params)
    bnb = require_bnb("lion_8bit", "lion", groups)
    return bnb.optim.Lion8bit(groups, lr=lr, betas=(b1, b2), weight_decay=weight_decay, min_8bit_size=min_8bit_size)


def paged_lion_8bit(
    params: Iterable[Any],
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.99),
    weight_decay: float = 0.0,
    *,
    min_8bit_size: int = 4096,
) -> Optimizer:
    """Lion with an 8-bit momentum in paged (CUDA unified) memory (``bitsandbytes.optim.PagedLion8bit``).

    The arguments and math are those of :func:`lion_8bit`; paging as in :func:`paged_adamw_8bit`
    (non-paged with a warning on CPU).

    Raises:
        ValueError: invalid lr, betas, weight_decay or min_8bit_size.
        ModuleNotFoundError: bitsandbytes is not installed.
        RuntimeError: bitsandbytes cannot run 8-bit optimizers on this machine (use ``lion``).

    Example:
        >>> opt = build_optimizer(model, "paged_lion_8bit", lr=1e-4)

    Papers: Chen et al., arXiv:2302.06675; Dettmers et al., arXiv:2110.02861; QLoRA, arXiv:2305.14314.
    """
    b1, b2 = _validate("paged_lion_8bit", lr=lr, betas=betas, weight_decay=weight_decay, min_8bit_size=min_8bit_size)
    groups = _groups(params)
    bnb = require_bnb("paged_lion_8bit", "lion", groups)
    return bnb.optim.PagedLion8bit(
        groups, lr=lr, betas=(b1, b2), weight_decay=weight_decay, min_8bit_size=min_8bit_size
    )


_PAPER = "Dettmers et al., arXiv:2110.02861"
register(
    OptimInfo(
        name="adamw_8bit",
        cls=adamw_8bit,
        description="AdamW with block-wise 8-bit moments (bitsandbytes)",
        paper=_PAPER,
        default_lr=1e-3,
        extra="bnb",
    )
)
register(
    OptimInfo(
        name="paged_adamw_8bit",
        cls=paged_adamw_8bit,
        description="AdamW with 8-bit moments in paged CUDA memory (bitsandbytes; non-paged on CPU)",
        paper=f"{_PAPER}; QLoRA, arXiv:2305.14314",
        default_lr=1e-3,
        extra="bnb",
    )
)
register(
    OptimInfo(
        name="lion_8bit",
        cls=lion_8bit,
        description="Lion with a block-wise 8-bit momentum (bitsandbytes)",
        paper=f"Chen et al., arXiv:2302.06675; {_PAPER}",
        default_lr=1e-4,
        extra="bnb",
    )
)
register(
    OptimInfo(
        name="paged_lion_8bit",
        cls=paged_lion_8bit,
        description="Lion with an 8-bit momentum in paged CUDA memory (bitsandbytes; non-paged on CPU)",
        paper=f"Chen et al., arXiv:2302.06675; {_PAPER}; QLoRA, arXiv:2305.14314",
        default_lr=1e-4,
        extra="bnb",
    )
)
# Hugging Face TrainingArguments.optim: "adamw_8bit", "paged_adamw_8bit", "lion_8bit" and
# "paged_lion_8bit" are our names
register_alias("adamw_bnb_8bit", "adamw_8bit", source="huggingface")
