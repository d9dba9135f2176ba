"""``OptimizerMixin``: ``configure_optimizers`` for every registered algorithm, from a typed config."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_opt.optim.build import build_optimizer
from lightning_opt.optim.registry import validate_hparams

__all__ = ["OptimizerConfig", "OptimizerMixin"]


@dataclass
class OptimizerConfig:
    """What to optimize with: a registry name and its settings, validated when built.

    LightningCLI fills this from YAML (``model.init_args.optimizer``)::

        optimizer:
          name: lion
          lr: 1.0e-4
          weight_decay: 0.1
          layer_decay: 0.8
          lr_multipliers: {"lm_head": 10.0}
          hparams: {betas: [0.9, 0.99]}

    Args:
        name: registry name, Hugging Face ``optim`` string or DeepSpeed ``type`` (case-insensitive).
        lr: base learning rate; ``None`` takes the algorithm's documented default
            (``get_optimizer_info(name).default_lr``).
        weight_decay: decay of the decayed parameters (matrices; not biases, norms, embeddings).
        layer_decay: layer-wise LR decay in (0, 1] (timm's rule), or ``None``.
        no_decay: name regexes of parameters without weight decay; replaces the default set.
        lr_multipliers: name regex -> lr factor (the first matching pattern wins).
        hparams: the algorithm's own hyperparameters (``betas``, ``momentum``, ...).

    Raises:
        ValueError: unknown name (with the closest names), invalid lr, betas, layer_decay or regex.
        TypeError: a hyperparameter the algorithm does not take.
    """

    name: str = "adamw"
    lr: float | None = None
    weight_decay: float = 0.0
    layer_decay: float | None = None
    no_decay: list[str] | None = None
    lr_multipliers: dict[str, float] | None = None
    hparams: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.hparams = {k: tuple(v) if k == "betas" and isinstance(v, list) else v for k, v in dict(self.hparams or {}).items()}
        info, _ = validate_hparams(self.name, lr=self.resolved_lr(), weight_decay=self.weight_decay, hparams=self.hparams)
        if self.layer_decay is not None and not (
            isinstance(self.layer_decay, (int, float)) and math.isfinite(self.layer_decay) and 0 < self.layer_decay <= 1
        ):
            raise ValueError(f"OptimizerConfig(layer_decay={self.layer_decay!r}) is invalid; it must lie in (0, 1]")
        for what, patterns in (("no_decay", self.no_decay or []), ("lr_multipliers", list(self.lr_multipliers or {}))):
            for p in patterns:
                try:
                    re.compile(p)
                except re.error as err:
                    raise ValueError(f"OptimizerConfig({what}) pattern {p!r} is not a valid regex: {err}") from err

    def resolved_lr(self) -> float:
        """``lr``, or the algorithm's default learning rate when ``lr`` is ``None``."""
        if self.lr is not None:
            return self.lr
        from lightning_opt.optim.registry import get_optimizer_info

        return get_optimizer_info(self.name).default_lr

    def build(self, model: nn.Module) -> Optimizer:
        """Build the optimizer over ``model``'s trainable parameters."""
        return build_optimizer(
            model,
            self.name,
            lr=self.resolved_lr(),
            weight_decay=self.weight_decay,
            layer_decay=self.layer_decay,
            no_decay=self.no_decay,
            lr_multipliers=self.lr_multipliers,
            **self.hparams,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# checkpoints store the config in the module's hparams; torch.load(weights_only=True), which
# Lightning uses when it restores a checkpoint, must be allowed to rebuild it
torch.serialization.add_safe_globals([OptimizerConfig])


def as_optimizer_config(value: OptimizerConfig | dict[str, Any] | str | None) -> OptimizerConfig:
    """Accept a config, a dict of its fields, or a bare name."""
    if value is None:
        return OptimizerConfig()
    if isinstance(value, OptimizerConfig):
        return value
    if isinstance(value, str):
        return OptimizerConfig(name=value)
    if isinstance(value, dict):
        return OptimizerConfig(**value)
    raise TypeError(f"optimizer config must be an OptimizerConfig, a dict or a name, got {type(value).__name__}")


class OptimizerMixin:
    """LightningModule mixin: ``configure_optimizers`` from ``self.optimizer`` (an :class:`OptimizerConfig`).

    Put it before ``LightningModule`` in the bases and set ``self.optimizer`` in ``__init__``
    (an ``OptimizerConfig``, a dict of its fields or a registry name; unset means AdamW at its
    default lr). Callbacks the algorithm needs (schedule-free's train/eval switch, Sophia's Hessian
    refresh) are added by ``configure_callbacks`` unless the Trainer already has one of that type.

    Example:
        >>> class MyModel(OptimizerMixin, L.LightningModule):
        ...     def __init__(self, optimizer: OptimizerConfig = OptimizerConfig("lion", lr=1e-4)):
        ...         super().__init__()
        ...         self.optimizer = optimizer
    """

    def optimizer_config(self) -> OptimizerConfig:
        return as_optimizer_config(getattr(self, "optimizer", None))

    @property
    def lr(self) -> float:
        """The base learning rate of ``self.optimizer``; setting it (``Tuner.lr_find(update_attr=True)``
        does) replaces the config with one at the new lr, validated again."""
        return self.optimizer_config().resolved_lr()

    @lr.setter
    def lr(self, value: float) -> None:
        self.optimizer = replace(self.optimizer_config(), lr=value)

    def configure_optimizers(self) -> Optimizer:
        return self.optimizer_config().build(self)  # type: ignore[arg-type]

    def configure_callbacks(self) -> list[Any]:
        from lightning_opt.optim.registry import get_optimizer_info, make_callbacks

        info = get_optimizer_info(self.optimizer_config().name)
        trainer = getattr(self, "_trainer", None)
        present = tuple(type(cb) for cb in (trainer.callbacks if trainer is not None else []))
        needed = make_callbacks(info)
        return [cb for cb in needed if not isinstance(cb, present)]
