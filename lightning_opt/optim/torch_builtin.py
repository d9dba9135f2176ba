"""The optimizers torch ships, registered under their names (each backed by torch's own class).

Each entry is a small factory that builds torch's own class (``build_optimizer(m, "adamw")`` is a
``torch.optim.AdamW``) and takes torch's arguments plus ``impl``, which picks torch's
implementation: ``"for_loop"`` (``foreach=False``), ``"foreach"`` (``foreach=True``), ``"fused"``
(``fused=True``; SGD, Adam, AdamW and Adagrad only) or ``"auto"`` (the default). ``"auto"`` takes
torch's fused kernel where it runs and is correct (on the CPU it is ~5x faster than torch's default
for-loop for AdamW), and torch's own default everywhere else (``foreach`` on CUDA, the for-loop on
the CPU). Torch's own ``foreach=``/``fused=`` are honoured as given (with ``impl="auto"``).

The Hugging Face ``TrainingArguments.optim`` strings and DeepSpeed ``optimizer.type`` values for
them are registered here too.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_opt.optim.base import check_betas
from lightning_opt.optim.engine import Impl, is_dtensor
from lightning_opt.optim.registry import OptimInfo, register, register_alias

__all__ = ["torch_backed"]

_PLAIN_TYPES = (Tensor, nn.Parameter)

# (class, device type) -> parameter dtypes "auto" runs torch's fused kernel for. Checked on torch
# 2.13 CPU against a float64 run: fused SGD leaves float16/bfloat16 parameters (nearly) unchanged
# on the CPU (errors 30-100x the for-loop's), so SGD keeps torch's default path for them there;
# fused Adam/AdamW/Adagrad are as accurate as the for-loop in bf16 and finite in fp16 where the
# fp16 for-loop overflows (eps underflows). Device types not listed use _FUSED_DTYPES_DEFAULT.
_HALF = (torch.float16, torch.bfloat16)
_FUSED_DTYPES_DEFAULT = (*_HALF, torch.float32, torch.float64)
_FUSED_DTYPES: dict[tuple[type[Optimizer], str], tuple[torch.dtype, ...]] = {
    (torch.optim.SGD, "cpu"): (torch.float32, torch.float64),
}
# the classes whose default path takes sparse gradients, which their fused kernels refuse
_TAKES_SPARSE = (torch.optim.SGD, torch.optim.Adagrad)


def _fused_devices() -> list[str]:
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    return _get_fused_kernels_supported_devices()


def _fusable(cls: type[Optimizer], t: Any, devices: list[str]) -> bool:
    """``t`` is a plain tensor that ``cls``'s fused kernel steps correctly."""
    if not isinstance(t, Tensor) or type(t) not in _PLAIN_TYPES or t.is_sparse or torch.is_complex(t):
        return False
    device = t.device.type
    return device in devices and t.dtype in _FUSED_DTYPES.get((cls, device), _FUSED_DTYPES_DEFAULT)


def _group_tensors(params: Any) -> list[Any] | None:
    """The tensors of one group's ``params`` entry (``(name, tensor)`` pairs too), or ``None``."""
    if isinstance(params, Tensor):
        return [params]
    if not isinstance(params, (list, tuple)):
        return None
    return [p[1] if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) else p for p in params]


class _FusedFallback:
    """Step pre-hook of an optimizer whose fused kernel ``impl="auto"`` picked.

    A group that the fused kernel cannot step (a sparse gradient, a group added later with complex
    or DTensor parameters) moves to torch's default path (``fused=None``), where torch's default
    would have worked, instead of failing. Each parameter's type is checked once (about 1 us).
    """

    def __init__(self, checked: set[int]) -> None:
        self.checked = checked  # ids of parameters known to be fusable (the optimizer holds them)

    def __call__(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        cls = type(optimizer)
        sparse = isinstance(optimizer, _TAKES_SPARSE)
        devices: list[str] | None = None
        for group in optimizer.param_groups:
            if not group.get("fused"):
                continue
            for p in group["params"]:
                if id(p) not in self.checked:
                    devices = devices or _fused_devices()
                    if not _fusable(cls, p, devices):
                        group["fused"] = None
                        break
                    self.checked.add(id(p))
                if sparse and p.grad is not None and p.grad.is_sparse:
                    group["fused"] = None
                    break


def _as_groups(params: Any) -> list[dict[str, Any]] | None:
    """``params`` as copied group dicts with their tensors read (a generator once), or ``None`` to leave to torch."""
    if isinstance(params, Tensor) or isinstance(params, (set, dict)):
        return None  # torch's own error
    items = list(params)
    groups = [dict(g) for g in items] if items and all(isinstance(g, dict) for g in items) else [{"params": items}]
    for group in groups:
        ps = group.get("params")
        if ps is not None and not isinstance(ps, (Tensor, list, tuple, set, dict)):
            group["params"] = list(ps)  # a generator, read once here (a set stays torch's error)
    return groups


# fused kernels that torch 2.13 cannot run on DTensor shards ("aten._fused_sgd_.default does not have a
# sharding strategy registered"); fused Adam/AdamW step shards (checked on 2 gloo ranks)
_FUSED_NO_DTENSOR = (torch.optim.SGD, torch.optim.Adagrad)


def _check_fused_runs(cls: type[Optimizer], groups: list[dict[str, Any]] | None) -> None:
    """Refuse ``impl="fused"`` where torch's fused kernel is known to compute wrong results."""
    for group in groups or []:
        for t in _group_tensors(group.get("params")) or []:
            if cls in _FUSED_NO_DTENSOR and isinstance(t, Tensor) and is_dtensor(t):
                raise ValueError(
                    f"{cls.__name__}(impl='fused'): torch {torch.__version__}'s fused {cls.__name__} kernel has no "
                    "DTensor (FSDP2 shard) support; use impl='auto' or 'foreach'"
                )
            if isinstance(t, Tensor) and t.dtype not in _FUSED_DTYPES.get((cls, t.device.type), _FUSED_DTYPES_DEFAULT):
                raise ValueError(
                    f"{cls.__name__}(impl='fused'): torch's fused {cls.__name__} kernel does not update {t.dtype} "
                    f"parameters on {t.device.type} correctly (torch {torch.__version__}); use impl='auto' or 'for_loop'"
                )


def _auto_fused(cls: type[Optimizer], groups: list[dict[str, Any]], hp: dict[str, Any]) -> Optimizer:
    """Build ``cls`` with its fused kernel for every group it steps correctly, torch's default elsewhere."""
    devices = _fused_devices()
    any_fused = False
    checked: set[int] = set()
    for group in groups:
        if "fused" in group or "foreach" in group:
            continue  # the group chose its implementation itself
        tensors = _group_tensors(group.get("params"))
        if tensors and not group.get("differentiable", False) and all(_fusable(cls, t, devices) for t in tensors):
            group["fused"] = True
            any_fused = True
            checked.update(id(t) for t in tensors)
        else:
            group["fused"] = None  # torch's default, not the fused default below
    if not any_fused:
        opt = cls(groups, **hp)
        # a checkpoint saved where the groups fused brings fused=True along (torch loads group options):
        # the pre-hook moves such a group back to torch's default where it cannot fuse (e.g. FSDP2 shards)
        opt.register_step_pre_hook(_FusedFallback(checked))
        return opt
    opt = cls(groups, **hp, fused=True)  # groups added later fuse too; the pre-hook catches misfits
    # GradScaler unscales the gradients before step() as for torch's default path (so gradient
    # clipping and gradient callbacks see true gradients), instead of leaving it to the kernel
    opt._step_supports_amp_scaling = False
    opt.register_step_pre_hook(_FusedFallback(checked))
    return opt


def torch_backed(cls: type[Optimizer], *, has_fused: bool) -> Callable[..., Optimizer]:
    """A factory building ``cls`` with torch's arguments plus ``impl`` (its signature says so).

    Args:
        cls: a ``torch.optim`` class.
        has_fused: torch has a fused kernel for ``cls`` (a ``fused=`` argument).

    The factory's ``impls`` attribute lists the impls it takes besides ``"auto"``; ``torch_class``
    is ``cls``.
    """
    torch_sig = inspect.signature(cls)
    impls: tuple[str, ...] = ("for_loop", "foreach", "fused") if has_fused else ("for_loop", "foreach")
    name = cls.__name__

    def make(params: Iterable[Any], *args: Any, impl: Impl = "auto", **kwargs: Any) -> Optimizer:
        choices = ("auto", *impls)
        if not isinstance(impl, str) or impl not in choices:
            hint = f"; torch's {name} has no Triton kernel" if impl == "triton" else ""
            hint += " (and no fused one)" if impl in ("fused", "triton") and not has_fused else ""
            raise ValueError(f"{name}(impl={impl!r}) is invalid; expected one of {choices}{hint}")
        hp = dict(torch_sig.bind(params, *args, **kwargs).arguments)  # TypeError as torch's for a typo
        params = hp.pop("params")
        if "betas" in hp:  # torch checks their range, not how many there are (a third fails at step)
            hp["betas"] = check_betas(name, hp["betas"], len(torch_sig.parameters["betas"].default))
        given = {k: hp[k] for k in ("foreach", "fused") if k in hp}
        if impl != "auto":
            if given:
                k, v = next(iter(given.items()))
                raise ValueError(
                    f"{name}(impl={impl!r}) and {k}={v!r} both choose the implementation; pass impl "
                    f"('for_loop' is foreach=False, 'foreach' foreach=True, 'fused' fused=True) or torch's {k}, not both"
                )
            if impl == "fused":
                groups = _as_groups(params)
                _check_fused_runs(cls, groups)
                return cls(params if groups is None else groups, **hp, fused=True)
            return cls(params, **hp, foreach=impl == "foreach")
        if given or not has_fused or hp.get("differentiable", False):
            return cls(params, **hp)  # torch's own choice: foreach on CUDA, for-loop on the CPU
        groups = _as_groups(params)
        return cls(params, **hp) if groups is None else _auto_fused(cls, groups, hp)

    make.__name__ = make.__qualname__ = name
    make.__module__ = __name__
    make.__doc__ = (
        f"torch.optim.{name} with ``impl``: ``'auto'`` (default: "
        + ("torch's fused kernel where it runs, torch's default otherwise" if has_fused else "torch's default: foreach on CUDA, for-loop on the CPU")
        + f"), {', '.join(repr(i) for i in impls)}. Other arguments are torch's.\n\n"
        f"Raises:\n    ValueError: an unknown ``impl``, or ``impl`` other than ``'auto'`` together with ``foreach``/``fused``."
    )
    impl_param = inspect.Parameter("impl", inspect.Parameter.KEYWORD_ONLY, default="auto", annotation=Impl)
    make.__signature__ = torch_sig.replace(parameters=[*torch_sig.parameters.values(), impl_param], return_annotation=cls)  # type: ignore[attr-defined]
    make.impls = impls  # type: ignore[attr-defined]
    make.torch_class = cls  # type: ignore[attr-defined]
    return make


SGD = torch_backed(torch.optim.SGD, has_fused=True)
Adam = torch_backed(torch.optim.Adam, has_fused=True)
AdamW = torch_backed(torch.optim.AdamW, has_fused=True)
Adagrad = torch_backed(torch.optim.Adagrad, has_fused=True)
RMSprop = torch_backed(torch.optim.RMSprop, has_fused=False)
RAdam = torch_backed(torch.optim.RAdam, has_fused=False)
NAdam = torch_backed(torch.optim.NAdam, has_fused=False)

_TORCH = [
    OptimInfo(name="sgd", cls=SGD, default_lr=1e-2, description="SGD with optional (heavy-ball) momentum", paper="Robbins & Monro 1951; Polyak 1964"),
    OptimInfo(name="sgd_nesterov", cls=SGD, default_lr=1e-2, fixed={"nesterov": True}, defaults={"momentum": 0.9}, hparams=("lr", "momentum", "dampening", "weight_decay", "maximize", "foreach", "differentiable", "fused", "impl"), description="SGD with Nesterov momentum (default 0.9)", paper="Sutskever et al., ICML 2013"),
    OptimInfo(name="adagrad", cls=Adagrad, default_lr=1e-2, description="Adagrad", paper="Duchi, Hazan & Singer, JMLR 2011"),
    OptimInfo(name="rmsprop", cls=RMSprop, default_lr=1e-3, description="RMSprop (eps outside the sqrt, as torch)", paper="Hinton, Coursera lecture 6e, 2012"),
    OptimInfo(name="adam", cls=Adam, default_lr=1e-3, description="Adam (L2 weight decay added to the gradient)", paper="Kingma & Ba, arXiv:1412.6980"),
    OptimInfo(name="adamw", cls=AdamW, default_lr=1e-3, description="AdamW (decoupled weight decay, lr-coupled as torch)", paper="Loshchilov & Hutter, arXiv:1711.05101"),
    OptimInfo(name="radam", cls=RAdam, default_lr=1e-3, description="Rectified Adam", paper="Liu et al., arXiv:1908.03265"),
    OptimInfo(name="nadam", cls=NAdam, default_lr=2e-3, description="Adam with Nesterov momentum", paper="Dozat, ICLR workshop 2016"),
]

for _info in _TORCH:
    register(_info)

# Hugging Face TrainingArguments.optim (its "sgd", "adagrad", "rmsprop" and "adafactor" are our
# names already; HF's "adafactor" settings are applied by lightning_opt.hf, see optim/adafactor.py)
register_alias("adamw_torch", "adamw", source="huggingface")
register_alias("adamw_torch_fused", "adamw", source="huggingface", fused=True)
# DeepSpeed optimizer.type, matched case-insensitively ("Adam"/"AdamW" are our names; DeepSpeed's
# "Adam" with adam_w_mode=True, its default, is handled in lightning_opt.deepspeed; AdaFactorOptimizer
# is in optim/adafactor.py)
