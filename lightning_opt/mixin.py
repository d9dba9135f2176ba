"""``OptimizerMixin``: ``configure_optimizers`` for every registered algorithm, from a typed config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_opt.optim.build import build_optimizer, check_buildable
from lightning_opt.optim.layout import refuse_flat_param_strategy
from lightning_opt.optim.param_groups import check_grouping, mup_rule_for

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
        lr_multipliers: name regex -> lr factor > 0 (the first matching pattern wins).
        mup_base_width, mup_width: μP learning rates (see ``param_groups``): dimensions of size
            ``k * mup_width`` grow with width, ``mup_base_width`` is the width the lr was tuned at;
            ``mup_width=None`` reads the width from the model (``n_embd``, ``hidden_size``, ...).
        mup_base_shapes: μP overrides, name regex -> base shape (``None`` for a dimension that does
            not grow), e.g. ``{"lm_head": [null, 64]}``; alone, it marks exactly those parameters.
        hparams: the algorithm's own hyperparameters (``betas``, ``momentum``, ...).

    Raises:
        ValueError: unknown name (with the closest names), invalid lr, betas, layer_decay, regex,
            lr multiplier (finite, > 0) or μP option, μP options for an algorithm without a μP rule.
        TypeError: a hyperparameter the algorithm does not take; ``no_decay`` not a list of regexes.
    """

    name: str = "adamw"
    lr: float | None = None
    weight_decay: float = 0.0
    layer_decay: float | None = None
    no_decay: list[str] | None = None
    lr_multipliers: dict[str, float] | None = None
    mup_base_width: int | None = None
    mup_width: int | None = None
    mup_base_shapes: dict[str, list[int | None]] | None = None
    hparams: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.hparams = {k: tuple(v) if k == "betas" and isinstance(v, list) else v for k, v in dict(self.hparams or {}).items()}
        # the registry's checks and the algorithm's own (built once over a stand-in parameter)
        info = check_buildable(self.name, lr=self.resolved_lr(), weight_decay=self.weight_decay, hparams=self.hparams)
        check_grouping(**self._grouping(), what="OptimizerConfig")
        if self.mup_base_width is not None or self.mup_base_shapes is not None:
            mup_rule_for(info.name)

    def _grouping(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("layer_decay", "no_decay", "lr_multipliers", "mup_base_width", "mup_width", "mup_base_shapes")}

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
            **self._grouping(),
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
        optimizer = self.optimizer_config().build(self)  # type: ignore[arg-type]
        trainer = getattr(self, "_trainer", None)
        if trainer is not None:  # FSDP1/DeepSpeed would flatten what per-tensor/matrix optimizers need whole
            refuse_flat_param_strategy(optimizer, trainer.strategy)
        return optimizer

    def configure_callbacks(self) -> list[Any]:
        from lightning_opt.optim.registry import get_optimizer_info, make_callbacks

        info = get_optimizer_info(self.optimizer_config().name)
        trainer = getattr(self, "_trainer", None)
        present = tuple(type(cb) for cb in (trainer.callbacks if trainer is not None else []))
        needed = make_callbacks(info)
        return [cb for cb in needed if not isinstance(cb, present)]
