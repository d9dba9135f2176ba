"""lightning_opt: every modern optimizer, LR schedule and training-stability aid for Lightning, by name.

Importing this package never imports triton, bitsandbytes or transformer_engine.
"""

from lightning_opt.deepspeed import from_deepspeed_config
from lightning_opt.hf import from_hf_training_args, hf_lr_schedule
from lightning_opt.mixin import OptimizerConfig, OptimizerMixin
from lightning_opt.optim import (
    OptimInfo,
    aliases,
    available_optimizers,
    build_optimizer,
    get_optimizer_info,
    param_groups,
    register,
    register_alias,
)

__version__ = "0.1.0"

__all__ = [
    "OptimInfo",
    "OptimizerConfig",
    "OptimizerMixin",
    "from_deepspeed_config",
    "from_hf_training_args",
    "hf_lr_schedule",
    "__version__",
    "aliases",
    "available_optimizers",
    "build_optimizer",
    "get_optimizer_info",
    "param_groups",
    "register",
    "register_alias",
]
