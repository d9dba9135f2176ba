"""The optimizers torch ships, registered under their names (each backed by torch's own class).

The Hugging Face ``TrainingArguments.optim`` strings and DeepSpeed ``optimizer.type`` values for
them are registered here too.
"""

from __future__ import annotations

import torch

from lightning_opt.optim.registry import OptimInfo, register, register_alias

_TORCH = [
    OptimInfo(name="sgd", cls=torch.optim.SGD, default_lr=1e-2, description="SGD with optional (heavy-ball) momentum", paper="Robbins & Monro 1951; Polyak 1964"),
    OptimInfo(name="sgd_nesterov", cls=torch.optim.SGD, default_lr=1e-2, fixed={"nesterov": True, "momentum": 0.9}, hparams=("lr", "dampening", "weight_decay", "maximize", "foreach", "differentiable", "fused"), description="SGD with Nesterov momentum 0.9", paper="Sutskever et al., ICML 2013"),
    OptimInfo(name="adagrad", cls=torch.optim.Adagrad, default_lr=1e-2, description="Adagrad", paper="Duchi, Hazan & Singer, JMLR 2011"),
    OptimInfo(name="rmsprop", cls=torch.optim.RMSprop, default_lr=1e-3, description="RMSprop (eps outside the sqrt, as torch)", paper="Hinton, Coursera lecture 6e, 2012"),
    OptimInfo(name="adam", cls=torch.optim.Adam, default_lr=1e-3, description="Adam (L2 weight decay added to the gradient)", paper="Kingma & Ba, arXiv:1412.6980"),
    OptimInfo(name="adamw", cls=torch.optim.AdamW, default_lr=1e-3, description="AdamW (decoupled weight decay, lr-coupled as torch)", paper="Loshchilov & Hutter, arXiv:1711.05101"),
    OptimInfo(name="radam", cls=torch.optim.RAdam, default_lr=1e-3, description="Rectified Adam", paper="Liu et al., arXiv:1908.03265"),
    OptimInfo(name="nadam", cls=torch.optim.NAdam, default_lr=2e-3, description="Adam with Nesterov momentum", paper="Dozat, ICLR workshop 2016"),
    OptimInfo(name="adafactor", cls=torch.optim.Adafactor, default_lr=1e-2, description="Adafactor (torch's: factored second moment, relative step)", paper="Shazeer & Stern, arXiv:1804.04235"),
]

for _info in _TORCH:
    register(_info)

# Hugging Face TrainingArguments.optim (its "sgd", "adagrad", "rmsprop" and "adafactor" are our
# names already; HF's "adafactor" is transformers' variant, which differs from torch's in its
# defaults: relative_step/scale_parameter; ours is torch's, see docs)
register_alias("adamw_torch", "adamw", source="huggingface")
register_alias("adamw_torch_fused", "adamw", source="huggingface", fused=True)
# DeepSpeed optimizer.type, matched case-insensitively ("Adam"/"AdamW" are our names; DeepSpeed's
# "Adam" with adam_w_mode=True, its default, is handled in lightning_opt.deepspeed)
register_alias("AdaFactorOptimizer", "adafactor", source="deepspeed")
