"""Hugging Face ``TrainingArguments`` to the optimizer and LR schedule Hugging Face's ``Trainer`` would build.

:func:`from_hf_training_args` builds, from our registry, exactly the optimizer ``transformers``'
``Trainer.create_optimizer`` builds (transformers 5.24: its decay/no-decay split, the keyword
arguments of its ``optim`` handler, the 8-bit embedding override), and :func:`hf_lr_schedule`
turns ``lr_scheduler_type``/``warmup_steps``/``lr_scheduler_kwargs`` into an
:class:`~lightning_opt.callbacks.LRSchedule` with the multiplier of ``transformers.get_scheduler``
at every step. ``transformers`` itself is not needed (a mapping of the fields works); a
``TrainingArguments`` object is read by attribute.

Example:
    >>> args = TrainingArguments("out", optim="adamw_torch", learning_rate=3e-4, weight_decay=0.1,
    ...                          lr_scheduler_type="cosine", warmup_steps=0.05, max_steps=10_000)
    >>> optimizer = from_hf_training_args(args, model)           # in configure_optimizers
    >>> trainer = L.Trainer(max_steps=args.max_steps, callbacks=[hf_lr_schedule(args)])
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn
from torch.optim import Optimizer

__all__ = ["HF_DEFAULTS", "from_hf_training_args", "hf_decay_parameter_names", "hf_lr_schedule", "hf_optimizer_names"]

#: ``TrainingArguments``' defaults (transformers 5.24) of the fields read here; a mapping may omit them
HF_DEFAULTS: dict[str, Any] = {
    "optim": "adamw_torch_fused",
    "optim_args": None,
    "optim_target_modules": None,
    "learning_rate": 5e-5,
    "weight_decay": 0.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "warmup_steps": 0,
    "lr_scheduler_type": "linear",
    "lr_scheduler_kwargs": None,
    "max_steps": -1,
}
# transformers' get_decay_parameter_names: names that never decay, searched in every dotted suffix
_NO_DECAY_PATTERNS = [re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")]
_TRUE = ("true", "1", "yes")


def _field(args: Any, name: str) -> Any:
    if isinstance(args, Mapping):
        return args.get(name, HF_DEFAULTS[name])
    return getattr(args, name, HF_DEFAULTS[name])


def _check_mapping(args: Any) -> None:
    """A mapping's keys must be ``TrainingArguments`` fields (a typo would otherwise be dropped)."""
    if not isinstance(args, Mapping):
        return
    known = set(HF_DEFAULTS) | {"warmup_ratio"}
    try:
        import dataclasses

        from transformers import TrainingArguments

        known |= {f.name for f in dataclasses.fields(TrainingArguments)}
    except ImportError:  # without transformers: the fields read here, and only those
        pass
    unknown = sorted(k for k in args if k not in known)
    if unknown:
        raise ValueError(f"from_hf_training_args: {unknown} are not TrainingArguments fields")


def hf_decay_parameter_names(model: nn.Module) -> list[str]:
    """The names of the parameters Hugging Face's ``Trainer`` decays (``get_decay_parameter_names``).

    A parameter is not decayed if it lies inside an ``nn.LayerNorm`` (below the root) or if any
    dotted suffix of its name, lower-cased, matches ``bias``, ``layernorm``, ``rmsnorm``, a module
    called ``norm`` or a name ending in ``_norm``. Everything else decays, embeddings included.
    """
    names: list[str] = []

    def visit(module: nn.Module, path: list[str], in_norm: bool) -> None:
        for key in module._parameters:
            full = [*path, key]
            suffixes = (".".join(full[i:]).lower() for i in range(len(full)))
            if not in_norm and not any(p.search(s) for s in suffixes for p in _NO_DECAY_PATTERNS):
                names.append(".".join(full))
        for child_name, child in module.named_children():
            visit(child, [*path, child_name], in_norm or isinstance(child, nn.LayerNorm))

    visit(model, [], False)
    return names


def _optim_args(args: Any) -> dict[str, str]:
    """``optim_args`` (``"k=v,k=v"``, spaces ignored, as transformers parses it) as a dict of strings."""
    raw = _field(args, "optim_args")
    if not raw:
        return {}
    out = {}
    for item in str(raw).replace(" ", "").split(","):
        key, sep, value = item.partition("=")
        if not sep or not key or "=" in value:
            raise ValueError(f"optim_args={raw!r} is invalid: expected 'key=value' pairs separated by commas")
        out[key] = value
    return out


def _flag(name: str, key: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"optim_args {key}={value!r} for {name!r} is invalid: expected true or false")


class _Ctx:
    """What an ``optim`` handler reads: the arguments, the parsed ``optim_args`` and what it consumed."""

    def __init__(self, args: Any, name: str) -> None:
        self.args = args
        self.name = name
        self.lr = float(_field(args, "learning_rate"))
        self.betas = (float(_field(args, "adam_beta1")), float(_field(args, "adam_beta2")))
        self.eps = float(_field(args, "adam_epsilon"))
        self.weight_decay = float(_field(args, "weight_decay"))
        self.optim_args = _optim_args(args)
        self.used: set[str] = set()

    def opt(self, key: str, default: Any, cast: Callable[[str], Any] = float) -> Any:
        self.used.add(key)
        if key not in self.optim_args:
            return default
        raw = self.optim_args[key]
        try:
            return cast(raw)
        except ValueError as err:
            raise ValueError(f"optim_args {key}={raw!r} for {self.name!r} is invalid: {err}") from None

    def flag(self, key: str, default: bool) -> bool:
        return self.opt(key, default, lambda v: _flag(self.name, key, v))

    def check_all_used(self) -> None:
        unused = sorted(set(self.optim_args) - self.used)
        if unused:
            took = ", ".join(sorted(self.used)) or "none"
            raise ValueError(
                f"optim_args {unused} are not read by Hugging Face's Trainer for optim={self.name!r} (it reads: {took}); "
                "remove them: lightning_opt does not drop arguments silently"
            )


# --------------------------------------------------------------------------------------------------
# one handler per Hugging Face optim name: (registry name, keyword arguments, groups rule)
# "groups": "decay" is the Trainer's decay/no-decay split; "model" means the Trainer passes the
# model itself (LOMO: no weight-decay groups); "low_rank" is its optim_target_modules split.


def _adamw(ctx: _Ctx) -> tuple[str, dict, str]:
    return ctx.name, {"betas": ctx.betas, "eps": ctx.eps}, "decay"


def _adafactor(ctx: _Ctx) -> tuple[str, dict, str]:
    from lightning_opt.optim.adafactor import TRANSFORMERS_ADAFACTOR

    # transformers.Adafactor with the Trainer's scale_parameter=False, relative_step=False
    kw = {**TRANSFORMERS_ADAFACTOR, "relative_step": False, "scale_parameter": False}
    return "adafactor", {k: v for k, v in kw.items() if v is not None}, "decay"  # None: the class default


def _sgd(ctx: _Ctx) -> tuple[str, dict, str]:
    kw = {k: ctx.opt(k, None) for k in ("momentum", "dampening")}
    kw["nesterov"] = ctx.flag("nesterov", None) if "nesterov" in ctx.optim_args else None
    _group_wd_only(ctx)
    return "sgd", {k: v for k, v in kw.items() if v is not None}, "decay"


def _adagrad(ctx: _Ctx) -> tuple[str, dict, str]:
    kw = {k: ctx.opt(k, None) for k in ("lr_decay", "eps")}
    _group_wd_only(ctx)
    return "adagrad", {k: v for k, v in kw.items() if v is not None}, "decay"


def _rmsprop(ctx: _Ctx) -> tuple[str, dict, str]:
    kw = {k: ctx.opt(k, None) for k in ("momentum", "alpha", "eps")}
    kw["centered"] = ctx.flag("centered", None) if "centered" in ctx.optim_args else None
    _group_wd_only(ctx)
    return "rmsprop", {k: v for k, v in kw.items() if v is not None}, "decay"


def _group_wd_only(ctx: _Ctx) -> None:
    if "weight_decay" in ctx.optim_args:
        raise ValueError(
            f"optim_args weight_decay for {ctx.name!r} has no effect in Hugging Face's Trainer (its parameter groups "
            "set weight_decay); set TrainingArguments.weight_decay instead"
        )


def _bnb(ctx: _Ctx) -> tuple[str, dict, str]:
    # transformers passes adam_beta1/adam_beta2 to Lion too (our lion's default beta2 is 0.99)
    kw: dict[str, Any] = {"betas": ctx.betas}
    if "adam" in ctx.name:
        kw["eps"] = ctx.eps
    target = {"lion_32bit": "lion", "adamw_bnb_8bit": "adamw_8bit"}.get(ctx.name, ctx.name)
    return target, kw, "decay"


def _schedule_free(ctx: _Ctx) -> tuple[str, dict, str]:
    kw: dict[str, Any] = {"weight_lr_power": ctx.opt("weight_lr_power", 2.0), "r": ctx.opt("r", 0.0)}
    if ctx.name != "schedule_free_sgd":
        kw.update(betas=ctx.betas, eps=ctx.eps)
    if ctx.name != "schedule_free_radam":
        warmup = _field(ctx.args, "warmup_steps")
        if not float(warmup).is_integer():
            raise ValueError(
                f"optim={ctx.name!r} takes warmup_steps={warmup!r} as a step count (Hugging Face passes it unchanged to "
                "schedulefree); give a whole number of steps"
            )
        kw["warmup_steps"] = int(warmup)
    return ctx.name, kw, "decay"


def _stable_adamw(ctx: _Ctx) -> tuple[str, dict, str]:
    kw: dict[str, Any] = {"betas": ctx.betas, "eps": ctx.eps, "decouple_lr": ctx.flag("decouple_lr", False)}
    max_lr = ctx.opt("max_lr", None)
    if max_lr is not None:
        kw["max_lr"] = max_lr
    # torch-optimi's kahan_sum=None (the default) turns Kahan summation on for bf16/fp16 parameters;
    # ours applies Kahan only to those anyway, so None and True are the same here
    kw["kahan_sum"] = ctx.flag("kahan_sum", True)
    return "stable_adamw", kw, "decay"


def _grokadamw(ctx: _Ctx) -> tuple[str, dict, str]:
    kw = {
        "alpha_init": ctx.opt("alpha_init", 0.98),
        "lamb": ctx.opt("lamb", 2.0),
        "gamma": ctx.opt("gamma", 0.1),
        "grokking_signal_decay_rate": ctx.opt("grokking_signal_decay_rate", 0.1),
        "gradient_clipping": ctx.opt("gradient_clipping", 1.0),
    }
    return "grokadamw", kw, "decay"  # transformers passes no betas/eps: GrokAdamW's (0.9, 0.999), 1e-8


def _apollo(ctx: _Ctx) -> tuple[str, dict, str]:
    proj_type = ctx.opt("proj_type", "std", str)
    if proj_type != "std":
        raise ValueError(f"optim_args proj_type={proj_type!r} for 'apollo_adamw': only 'std' is implemented here")
    kw = {
        "rank": ctx.opt("rank", 128, int),
        "proj": ctx.opt("proj", "random", str),
        "scale_type": ctx.opt("scale_type", "channel", str),
        "update_proj_gap": ctx.opt("update_proj_gap", 200, int),
        "scale": ctx.opt("scale", 1.0),
    }
    return "apollo", kw, "low_rank"


def _lomo(ctx: _Ctx) -> tuple[str, dict, str]:
    return ctx.name, {}, "model"


_HANDLERS: dict[str, Callable[[_Ctx], tuple[str, dict, str]]] = {
    "adamw_torch": _adamw,
    "adamw_torch_fused": _adamw,
    "adafactor": _adafactor,
    "sgd": _sgd,
    "adagrad": _adagrad,
    "rmsprop": _rmsprop,
    "adamw_8bit": _bnb,
    "adamw_bnb_8bit": _bnb,
    "paged_adamw_8bit": _bnb,
    "lion_8bit": _bnb,
    "paged_lion_8bit": _bnb,
    "lion_32bit": _bnb,
    "schedule_free_adamw": _schedule_free,
    "schedule_free_sgd": _schedule_free,
    "schedule_free_radam": _schedule_free,
    "stable_adamw": _stable_adamw,
    "grokadamw": _grokadamw,
    "apollo_adamw": _apollo,
    "lomo": _lomo,
    "adalomo": _lomo,
}
_EIGHT_BIT = ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "lion_8bit", "paged_lion_8bit")


def hf_optimizer_names() -> list[str]:
    """The Hugging Face ``optim`` names :func:`from_hf_training_args` builds."""
    return sorted(_HANDLERS)


def _hf_target_names(model: nn.Module, targets: Any) -> list[str]:
    """The weights of the ``nn.Linear`` modules ``optim_target_modules`` selects (transformers' rule)."""
    if targets is None:
        raise ValueError("optim='apollo_adamw' needs optim_target_modules (a list of names, a regex or 'all-linear')")
    if not isinstance(targets, (list, str)):
        raise TypeError(f"optim_target_modules must be a list of strings, a regex string or 'all-linear', got {targets!r}")
    all_linear = isinstance(targets, str) and targets.replace("_", "-") == "all-linear"
    names = []
    for module_name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if all_linear:
            hit = True
        elif isinstance(targets, str):
            hit = re.fullmatch(targets, module_name) is not None
        else:  # a list: an exact name, or a name ending in ".<target>"
            hit = any(module_name == t or module_name.endswith(f".{t}") for t in targets)
        if hit:
            names.append(module_name + ".weight")
    if not names:
        raise ValueError(f"optim_target_modules={targets!r} selects no nn.Linear module of the model")
    return names


def from_hf_training_args(args: Any, model: nn.Module) -> Optimizer:
    """The optimizer Hugging Face's ``Trainer`` builds for ``args`` and ``model``, from our registry.

    Reads ``optim``, ``optim_args``, ``optim_target_modules``, ``learning_rate``, ``weight_decay``,
    ``adam_beta1``, ``adam_beta2`` and ``adam_epsilon`` as transformers 5.24 does:

    - parameter groups: the decayed parameters (:func:`hf_decay_parameter_names`: embeddings decay)
      with ``weight_decay``, the rest with 0; ``lomo``/``adalomo`` get the model's parameters in one
      group without decay (the Trainer passes the model); ``apollo_adamw`` gets the other parameters
      (the AdamW side, with APOLLO-AdamW's own betas ``(0.9, 0.999)``, eps ``1e-6`` and no decay) and
      the ``optim_target_modules`` weights (APOLLO, with ``adam_*``), as the Trainer does;
    - each name's keyword arguments (``optim_args`` included; see the README's table for where they
      differ from our registry defaults), e.g. ``adafactor`` is transformers' Adafactor with
      ``scale_parameter=False, relative_step=False``, and the Lion names take ``adam_beta2``;
    - 8-bit names: ``nn.Embedding`` weights keep 32-bit state (bitsandbytes' ``GlobalOptimManager``
      override the Trainer registers).

    Args:
        args: a ``transformers.TrainingArguments``, or a mapping of its fields (missing ones take
            :data:`HF_DEFAULTS`).
        model: the model whose parameters are trained (those with ``requires_grad``).

    Returns:
        The optimizer (schedule-free names need ``optimizer.train()`` before training, which
        ``OptimizerMixin``'s ``ScheduleFreeMode`` callback does under Lightning).

    Raises:
        ValueError: an ``optim`` name we do not build (the message lists those we do), ``optim_args``
            or ``optim_target_modules`` the Trainer would not read for that name, a bad ``optim_args``
            value, a mapping key that is not a ``TrainingArguments`` field.

    Example:
        >>> opt = from_hf_training_args({"optim": "adafactor", "learning_rate": 1e-3}, model)
    """
    from lightning_opt.optim import build_optimizer

    _check_mapping(args)
    name = _field(args, "optim")
    name = getattr(name, "value", name)  # an OptimizerNames enum
    handler = _HANDLERS.get(str(name))
    if handler is None:
        raise ValueError(
            f"Hugging Face optim={name!r} has no lightning_opt counterpart; lightning_opt builds: "
            f"{', '.join(hf_optimizer_names())}"
        )
    ctx = _Ctx(args, str(name))
    target, kwargs, grouping = handler(ctx)
    ctx.check_all_used()
    if grouping != "low_rank" and _field(args, "optim_target_modules") is not None:
        raise ValueError(
            f"optim_target_modules is not read by Hugging Face's Trainer for optim={name!r} (only by GaLore and "
            "APOLLO); remove it: lightning_opt does not drop arguments silently"
        )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if grouping == "decay":
        decay = set(hf_decay_parameter_names(model))
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": ctx.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        weight_decay = ctx.weight_decay
    elif grouping == "model":
        if ctx.weight_decay:
            warnings.warn(
                f"Hugging Face's Trainer passes the model to {name} and no weight_decay; weight_decay="
                f"{ctx.weight_decay} is not applied (as in Hugging Face)",
                stacklevel=2,
            )
        groups = [{"params": [p for _, p in model.named_parameters()], "weight_decay": 0.0}]
        weight_decay = 0.0
    else:  # low_rank: APOLLO's target split
        targets = set(_hf_target_names(model, _field(args, "optim_target_modules")))
        all_named = list(model.named_parameters())  # the Trainer takes every parameter here
        groups = [
            {"params": [p for n, p in all_named if n not in targets], "use_apollo": False, "betas": (0.9, 0.999), "eps": 1e-6},
            {"params": [p for n, p in all_named if n in targets], "use_apollo": True, "betas": ctx.betas, "eps": ctx.eps, **kwargs},
        ]
        kwargs = {"convention": "reference"}
        weight_decay = 0.0
    groups = [g for g in groups if g["params"]] if grouping != "decay" else groups
    opt = build_optimizer(groups, target, lr=ctx.lr, weight_decay=weight_decay, **kwargs)
    if str(name) in _EIGHT_BIT:
        import bitsandbytes as bnb

        manager = bnb.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return opt


# --------------------------------------------------------------------------------------------------
# schedules


def _warmup(args: Any, total: int | None) -> dict[str, Any]:
    """``warmup_steps`` (a count, or a fraction of the run when < 1) or a v4 ``warmup_ratio``, as LRSchedule options."""
    steps = float(_field(args, "warmup_steps") or 0)
    ratio = args.get("warmup_ratio") if isinstance(args, Mapping) else getattr(args, "warmup_ratio", None)
    if ratio:
        if steps:
            raise ValueError(f"give warmup_steps={steps!r} or warmup_ratio={ratio!r}, not both")
        steps = float(ratio)
    if steps < 0:
        raise ValueError(f"warmup_steps={steps!r} is invalid: it must be >= 0")
    if steps >= 1:
        return {"warmup_steps": int(steps)}  # transformers' int(): 2.7 steps are 2
    if steps == 0:
        return {"warmup_steps": 0}
    if total is not None:
        return {"warmup_steps": math.ceil(total * steps)}
    return {"warmup_ratio": steps}  # rounded up, as transformers', once the run length is known


def _kwargs(args: Any) -> dict[str, Any]:
    raw = _field(args, "lr_scheduler_kwargs") or {}
    if isinstance(raw, str):
        import json

        raw = json.loads(raw)
    return dict(raw)


def hf_lr_schedule(args: Any, total_steps: int | None = None) -> Any:
    """The :class:`~lightning_opt.callbacks.LRSchedule` equal to Hugging Face's scheduler for ``args``.

    The multiplier at every optimizer step equals ``transformers.get_scheduler(lr_scheduler_type,
    num_warmup_steps=args.get_warmup_steps(T), num_training_steps=T,
    scheduler_specific_kwargs=lr_scheduler_kwargs)``'s (T: ``total_steps``, else ``max_steps`` when
    > 0, else Lightning's ``trainer.estimated_stepping_batches``, Hugging Face's own count of
    optimizer steps). Expressible: ``linear``, ``cosine`` (``num_cycles=0.5``),
    ``cosine_with_restarts`` (whole periods), ``polynomial``, ``constant`` (Hugging Face ignores the
    warmup there: so does this, with a warning), ``constant_with_warmup``, ``inverse_sqrt``,
    ``cosine_with_min_lr``, ``cosine_warmup_with_min_lr`` (without ``warmup_lr_rate``),
    ``warmup_stable_decay`` (linear warmup; ``num_cycles=0.5``) and ``reduce_lr_on_plateau``
    (``plateau``, monitoring ``val_loss``; Hugging Face steps it on each evaluation).

    Raises:
        ValueError: a type or a ``lr_scheduler_kwargs`` value we cannot express (``greedy``, other
            ``num_cycles``, a cosine or 1-sqrt WSD warmup), with what to do instead.
    """
    from lightning_opt.callbacks import LRSchedule

    _check_mapping(args)
    kind = _field(args, "lr_scheduler_type")
    kind = str(getattr(kind, "value", kind))
    if total_steps is None and int(_field(args, "max_steps")) > 0:
        total_steps = int(_field(args, "max_steps"))
    kw = _kwargs(args)
    lr = float(_field(args, "learning_rate"))

    def take(*allowed: str) -> dict[str, Any]:
        extra = sorted(set(kw) - set(allowed))
        if extra:
            raise ValueError(
                f"lr_scheduler_kwargs {extra} are not read by Hugging Face's {kind!r} scheduler "
                f"(it reads: {', '.join(allowed) or 'none'})"
            )
        return kw

    def cycles(value: Any, what: str) -> None:
        if float(value) != 0.5:
            raise ValueError(f"{kind!r} with num_cycles={value!r}: only the half cosine (0.5) is expressible{what}")

    def min_ratio(k: dict[str, Any]) -> float:
        if k.get("min_lr") is not None and k.get("min_lr_rate") is not None:
            raise ValueError("Only one of min_lr or min_lr_rate should be set")
        if k.get("min_lr") is not None:
            return float(k["min_lr"]) / lr
        if k.get("min_lr_rate") is None:
            raise ValueError(f"{kind!r} needs min_lr or min_lr_rate in lr_scheduler_kwargs")
        return float(k["min_lr_rate"])

    warm = _warmup(args, total_steps)
    common = {"total_steps": total_steps}
    if kind == "linear":
        take()
        return LRSchedule("linear", **warm, **common)
    if kind == "cosine":
        cycles(take("num_cycles").get("num_cycles", 0.5), "")
        return LRSchedule("cosine", **warm, **common)
    if kind == "cosine_with_restarts":
        n = take("num_cycles").get("num_cycles", 1)
        if n == 1:
            return LRSchedule("cosine", **warm, **common)
        if total_steps is None or "warmup_ratio" in warm:
            raise ValueError("cosine_with_restarts with num_cycles > 1 needs total_steps (or max_steps) to fix the period")
        span = total_steps - warm["warmup_steps"]
        if not float(n).is_integer() or span % int(n):
            raise ValueError(
                f"cosine_with_restarts: {span} steps after warmup do not split into num_cycles={n} whole periods; "
                "LRSchedule('cosine_restarts', restart_period=...) needs an integer period"
            )
        return LRSchedule("cosine_restarts", restart_period=span // int(n), **warm, **common)
    if kind == "polynomial":
        k = take("lr_end", "power")
        lr_end = float(k.get("lr_end", 1e-7))
        if lr_end > lr:
            raise ValueError(f"lr_end ({lr_end}) must be smaller than initial lr ({lr})")
        return LRSchedule("polynomial", power=float(k.get("power", 1.0)), min_lr_ratio=lr_end / lr, **warm, **common)
    if kind == "constant":
        take()
        if any(warm.values()):
            warnings.warn(
                "Hugging Face's 'constant' scheduler ignores warmup_steps; so does this schedule "
                "(use lr_scheduler_type='constant_with_warmup' for a warmup)",
                stacklevel=2,
            )
        return LRSchedule("constant", total_steps=total_steps)
    if kind == "constant_with_warmup":
        take()
        return LRSchedule("constant", **warm, **common)
    if kind == "inverse_sqrt":
        k = take("timescale")
        extra = {"timescale": int(k["timescale"])} if k.get("timescale") is not None else {}
        return LRSchedule("inverse_sqrt", **warm, **extra, **common)
    if kind == "cosine_with_min_lr":
        k = take("num_cycles", "min_lr", "min_lr_rate")
        cycles(k.get("num_cycles", 0.5), "")
        return LRSchedule("cosine", min_lr_ratio=min_ratio(k), **warm, **common)
    if kind == "cosine_warmup_with_min_lr":
        k = take("num_cycles", "min_lr", "min_lr_rate", "warmup_lr_rate")
        cycles(k.get("num_cycles", 0.5), "")
        if k.get("warmup_lr_rate") is not None:
            raise ValueError(
                "cosine_warmup_with_min_lr with warmup_lr_rate warms up over W-1 steps, which LRSchedule does not "
                "express; leave warmup_lr_rate unset"
            )
        # warmup (t+1)/W and cosine progress (t-W+1)/(T-W): the inclusive warmup and a one-step offset
        if not any(warm.values()):
            return LRSchedule("cosine", min_lr_ratio=min_ratio(k), decay_offset=1, **common)
        return LRSchedule(
            "cosine", min_lr_ratio=min_ratio(k), warmup_type="linear_inclusive", decay_offset=1, **warm, **common
        )
    if kind == "warmup_stable_decay":
        k = take("num_decay_steps", "num_stable_steps", "warmup_type", "decay_type", "min_lr_ratio", "num_cycles")
        if "num_decay_steps" not in k:
            raise ValueError("warmup_stable_decay needs num_decay_steps in lr_scheduler_kwargs")
        if k.get("warmup_type", "linear") != "linear":
            raise ValueError(f"warmup_stable_decay with warmup_type={k['warmup_type']!r}: only the linear warmup is expressible")
        decay = k.get("decay_type", "cosine")
        if decay not in ("linear", "cosine", "1-sqrt"):
            raise ValueError(f"Unknown decay type: {decay}, expected 'linear', 'cosine' or '1-sqrt'")
        if decay == "cosine":
            cycles(k.get("num_cycles", 0.5), " for the WSD decay")
        r = float(k.get("min_lr_ratio", 0.0))
        opts: dict[str, Any] = {"decay_steps": int(k["num_decay_steps"]), "decay_shape": decay, "min_lr_ratio": r}
        if any(warm.values()):
            opts["warmup_init_ratio"] = r  # transformers' WSD warmup starts at min_lr_ratio
        if k.get("num_stable_steps") is not None:
            if "warmup_ratio" in warm:
                raise ValueError("warmup_stable_decay with num_stable_steps needs warmup_steps as a count")
            opts["decay_start"] = warm["warmup_steps"] + int(k["num_stable_steps"])
            if total_steps is None:
                total_steps = opts["decay_start"] + opts["decay_steps"]
        return LRSchedule("wsd", **warm, **opts, total_steps=total_steps)
    if kind == "reduce_lr_on_plateau":
        k = take("mode", "factor", "patience", "threshold", "threshold_mode", "cooldown", "min_lr", "eps")
        if isinstance(k.get("min_lr"), (list, tuple)):
            raise ValueError("reduce_lr_on_plateau with a min_lr per group is not expressible; give one min_lr")
        opts = {key: k[key] for key in ("mode", "factor", "patience", "threshold", "threshold_mode", "cooldown") if key in k}
        if "eps" in k:
            opts["eps"] = float(k["eps"]) / lr  # torch compares absolute lrs, LRSchedule multipliers
        min_lr = float(k.get("min_lr", 0.0))
        if any(warm.values()):
            warnings.warn(
                "Hugging Face's 'reduce_lr_on_plateau' scheduler ignores warmup_steps; so does this schedule",
                stacklevel=2,
            )
        return LRSchedule("plateau", min_lr_ratio=min_lr / lr, **opts)
    raise ValueError(
        f"lr_scheduler_type={kind!r} cannot be expressed as an LRSchedule (greedy adapts to the loss with its own "
        "state); expressible: linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, "
        "inverse_sqrt, cosine_with_min_lr, cosine_warmup_with_min_lr, warmup_stable_decay, reduce_lr_on_plateau"
    )
