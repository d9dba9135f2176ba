"""Shared pieces of the optimizer families: argument checks, dtype policy, sharding guard, state dtype.

Infrastructure (not a family: registers nothing).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_opt.optim.precision import LOW_PRECISION, compute_dtype, keep_state_dtype_on_load, new_kahan_comp

__all__ = [
    "DEFAULT_ADAMW_PATTERNS",
    "LOW_PRECISION",
    "adamw_update_",
    "backfill_group_defaults",
    "check_arg",
    "OptionCheck",
    "as_option_check",
    "beta_or_none",
    "check_betas",
    "check_flag",
    "check_hparam",
    "check_lr_wd",
    "check_options",
    "check_param_group",
    "check_rounding",
    "compute_dtype",
    "is_int",
    "is_number",
    "ensure_kahan_comp",
    "init_state",
    "int_at_least",
    "keep_state_dtype_on_load",
    "params_with_grad",
    "real_view",
    "reject_complex",
    "reject_sparse_grad",
    "run_closure",
]

#: Name regexes (``re.search``) of 2-D parameters that go to AdamW: embeddings anywhere in the name,
#: and the weight of a module called ``lm_head``/``head``/``output``/``classifier`` (the output
#: layer). Anchored on the owning module so BERT's hidden ``attention.output.dense`` stays on Muon.
DEFAULT_ADAMW_PATTERNS: tuple[str, ...] = (
    r"(?:^|[._])(?:embed\w*|embeddings?|wte|wpe|tok_emb\w*|pos_emb\w*)(?:\.|$)",
    r"(?:^|\.)(?:lm_head|head|output|classifier)\.weight$",
)


def adamw_update_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step, the non-matrix side of the hybrid optimizers (Muon, APOLLO) (torch's convention: ``p *= 1 - lr wd``; eps added to ``sqrt(v / bc2)``).

    ``step`` is the 1-based count of this update; moments are float32 for bf16/fp16 parameters.
    """
    dt = compute_dtype(param)
    g = grad.to(dt)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(eps)
    if param.dtype == dt:
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        param.addcdiv_(exp_avg, denom, value=-lr / bc1)
    else:
        p32 = param.to(dt)
        if weight_decay != 0:
            p32.mul_(1 - lr * weight_decay)
        param.copy_(p32.addcdiv_(exp_avg, denom, value=-lr / bc1))


def is_number(v: Any) -> bool:
    """A finite int or float, not a bool."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def is_int(v: Any) -> bool:
    """An int, not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def check_arg(cls: str, key: str, value: Any, ok: bool, hint: str) -> None:
    """Raise ``ValueError("{cls}({key}={value!r}) is invalid; {hint}")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{cls}({key}={value!r}) is invalid; {hint}")


def check_lr_wd(cls: str, lr: float, weight_decay: float) -> None:
    """Raise ``ValueError`` naming ``cls`` unless ``lr`` and ``weight_decay`` are finite and >= 0."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"{cls}(lr={lr!r}) is invalid; lr must be a finite number >= 0")
    if not isinstance(weight_decay, (int, float)) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"{cls}(weight_decay={weight_decay!r}) is invalid; it must be a finite number >= 0")


def check_flag(cls: str, key: str, value: Any) -> bool:
    """``value`` if it is a ``bool``, else ``ValueError`` naming ``cls`` and ``key``.

    ``bool(value)`` would turn the string ``"false"`` (a quoted YAML value) into ``True``.
    """
    if not isinstance(value, bool):
        raise ValueError(f"{cls}({key}={value!r}) is invalid; expected True or False")
    return value


def check_hparam(cls: str, key: str, value: Any) -> None:
    """The checks a hyperparameter's name implies, shared by the registry and the classes.

    ``betas`` entries (``None`` allowed) and ``beta``/``beta1``/``beta2``/``beta3`` in [0, 1);
    ``eps`` finite and >= 0; ``momentum`` in [0, 1); no NaN anywhere.

    Raises:
        ValueError: ``{cls}({key}={value!r}) is invalid; <hint>``.
    """
    if key == "betas":
        ok = isinstance(value, (tuple, list)) and len(value) > 0
        check_arg(cls, key, value, ok, "expected a tuple of floats in [0, 1)")
        for b in value:
            if b is not None:
                check_arg(cls, key, value, is_number(b) and 0 <= b < 1, "each beta must lie in [0, 1)")
    elif key in ("beta1", "beta2", "beta3", "beta"):
        check_arg(cls, key, value, is_number(value) and 0 <= value < 1, "each beta must lie in [0, 1)")
    elif key == "eps" and isinstance(value, (int, float)) and not isinstance(value, bool):
        check_arg(cls, key, value, math.isfinite(value) and value >= 0, "it must be a finite number >= 0")
    elif key == "momentum":
        check_arg(cls, key, value, is_number(value) and 0 <= value < 1, "it must lie in [0, 1)")
    elif isinstance(value, float) and math.isnan(value):
        check_arg(cls, key, value, False, "a hyperparameter must not be NaN")


def check_rounding(cls: str, kahan_sum: Any, stochastic_rounding: Any) -> dict[str, bool]:
    """The group options of the two roundings of bf16/fp16 updates (``precision``), checked.

    Raises:
        ValueError: a flag that is not a bool, or both on (they are exclusive).
    """
    kahan_sum = check_flag(cls, "kahan_sum", kahan_sum)
    stochastic_rounding = check_flag(cls, "stochastic_rounding", stochastic_rounding)
    if kahan_sum and stochastic_rounding:
        raise ValueError(f"{cls}(kahan_sum=True, stochastic_rounding=True) is invalid; choose one rounding")
    return {"kahan_sum": kahan_sum, "stochastic_rounding": stochastic_rounding}


def check_betas(cls: str, betas: Any, n: int = 2, *, key: str = "betas") -> tuple[float, ...]:
    """``betas`` as a tuple of ``n`` floats, or ``ValueError`` naming ``cls`` unless each is in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != n:
        raise ValueError(f"{cls}({key}={betas!r}) is invalid; expected a tuple of {n} floats in [0, 1)")
    for b in betas:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 1:
            raise ValueError(f"{cls}({key}={betas!r}) is invalid; each beta must lie in [0, 1)")
    return tuple(float(b) for b in betas)


#: one entry of a class's ``option_checks`` table: ``check(cls, key, value) -> value to store``;
#: it raises ``ValueError`` naming ``cls`` and ``key`` (use :func:`check_arg`)
OptionCheck = Callable[[str, str, Any], Any]

_ROUNDINGS = ("kahan_sum", "stochastic_rounding")


def check_options(
    cls: str,
    options: Mapping[str, Any],
    *,
    defaults: Mapping[str, Any] | None = None,
    impls: Sequence[str] | None = None,
    checks: Mapping[str, OptionCheck] | None = None,
) -> dict[str, Any]:
    """The one check of optimizer options, for a constructor's defaults and for a param group's own.

    Every option a param group may set means the same there as in the constructor because both go
    through this function: the constructor passes its ``defaults`` (before ``super().__init__``),
    :func:`check_param_group` the keys a group sets (before torch adds it). By key:

    - ``checks[key]`` (the class's ``option_checks``: its own options, e.g. Muon's ``ns_dtype``);
    - ``impl``: one of ``"auto"`` and ``impls`` (:func:`~lightning_opt.optim.engine.check_impl`);
    - ``lr``, ``weight_decay``: a finite number >= 0 (a tensor ``lr`` passes, as in torch);
    - ``betas``: as :func:`check_betas`, as many as the defaults have (two without defaults);
      ``beta*``, ``eps``, ``momentum``, NaN: :func:`check_hparam`;
    - a key whose default is a bool: :func:`check_flag`;
    - ``kahan_sum``/``stochastic_rounding``: :func:`check_rounding` of the pair (the one not given
      taken from ``defaults``).

    Returns:
        ``options`` with the checked values normalized (``betas`` a tuple, ``ns_dtype`` a dtype).

    Raises:
        ValueError: ``{cls}({key}={value!r}) is invalid; <hint>``.
    """
    from lightning_opt.optim.engine import check_impl

    defaults = defaults or {}
    checks = checks or {}
    out = dict(options)
    for key, value in options.items():
        if key in checks:
            out[key] = checks[key](cls, key, value)
        elif key == "impl" and impls is not None:
            out[key] = check_impl(cls, value, tuple(impls))
        elif key in ("lr", "weight_decay"):
            if not isinstance(value, Tensor):
                check_arg(cls, key, value, is_number(value) and value >= 0, "it must be a finite number >= 0")
        elif key == "betas" and value is not None:
            base = defaults.get("betas")
            n = len(base) if isinstance(base, (tuple, list)) else len(value) if isinstance(value, (tuple, list)) else 2
            if not isinstance(base, (tuple, list)) or None not in base:
                out[key] = check_betas(cls, value, n)
            else:
                check_hparam(cls, key, value)
        elif isinstance(defaults.get(key), bool):
            out[key] = check_flag(cls, key, value)
        elif key not in _ROUNDINGS:
            check_hparam(cls, key, value)
    if any(k in options for k in _ROUNDINGS):
        pair = [options.get(k, defaults.get(k, False)) for k in _ROUNDINGS]
        out.update({k: v for k, v in check_rounding(cls, *pair).items() if k in options})
    return out


def as_option_check(check: Callable[..., None], **kwargs: Any) -> OptionCheck:
    """A family's ``check(cls, key, value, **kwargs)`` (raises or returns ``None``) as an
    ``option_checks`` entry that keeps the value, so its constructor and its groups share it."""

    def entry(cls: str, key: str, value: Any) -> Any:
        check(cls, key, value, **kwargs)
        return value

    return entry


def int_at_least(low: int) -> OptionCheck:
    """An ``option_checks`` entry: an int (not a bool) >= ``low``."""

    def check(cls: str, key: str, value: Any) -> int:
        check_arg(cls, key, value, is_int(value) and value >= low, f"it must be an int >= {low}")
        return value

    return check


def number_in(ok: Callable[[float], bool], hint: str, *, optional: bool = False) -> OptionCheck:
    """An ``option_checks`` entry: a finite number (not a bool) with ``ok(value)``; ``None`` too if
    ``optional``. ``hint`` completes ``"... is invalid; "``."""

    def check(cls: str, key: str, value: Any) -> Any:
        check_arg(cls, key, value, (optional and value is None) or (is_number(value) and ok(value)), hint)
        return value

    return check


def one_of(choices: Sequence[Any]) -> OptionCheck:
    """An ``option_checks`` entry: one of ``choices``."""

    def check(cls: str, key: str, value: Any) -> Any:
        check_arg(cls, key, value, value in choices, f"expected one of {tuple(choices)}")
        return value

    return check


def beta_or_none(cls: str, key: str, value: Any) -> float | None:
    """An ``option_checks`` entry: ``None`` or a float in [0, 1)."""
    ok = value is None or (is_number(value) and 0 <= value < 1)
    check_arg(cls, key, value, ok, "expected None or a float in [0, 1)")
    return value


def check_param_group(optimizer: Optimizer, param_group: Any, cls: str | None = None) -> dict[str, Any]:
    """``param_group`` checked, for ``add_param_group`` to hand to torch's: nothing is added on an error.

    The options the group sets that the optimizer has (``optimizer.defaults``) go through
    :func:`check_options` with the class's ``impls`` and ``option_checks``; a class whose
    ``supports_complex`` is false refuses complex parameters (:func:`reject_complex`). A generator
    of parameters is read once here; torch's own errors (a set, a non-dict) are left to torch.

    Returns:
        A copy of ``param_group`` with the checked options normalized.
    """
    if not isinstance(param_group, dict):
        return param_group  # torch's TypeError
    kind = type(optimizer)
    cls = cls or kind.__name__
    group = dict(param_group)
    params = group.get("params")
    if params is not None and not isinstance(params, (Tensor, set)):
        group["params"] = params = list(params)
    defaults = getattr(optimizer, "defaults", {})
    own = {k: v for k, v in group.items() if k in defaults and k != "params"}
    group.update(
        check_options(
            cls,
            own,
            defaults=defaults,
            impls=getattr(kind, "impls", None),
            checks=getattr(kind, "option_checks", None),
        )
    )
    if not getattr(kind, "supports_complex", True):
        reject_complex(cls, params)
    return group


def reject_complex(cls: str, params: Any) -> None:
    """Raise if ``params`` (a tensor, tensors or ``(name, tensor)`` pairs) holds a complex tensor.

    For optimizers with per-tensor or matrix statistics (norms, factored moments, orthogonalized
    updates): treating ``z`` as its ``view_as_real`` pair would change what they compute.

    Raises:
        ValueError: ``{cls} does not support complex parameters``.
    """
    items = [params] if isinstance(params, Tensor) else list(params or ())
    for item in items:
        t = item[1] if isinstance(item, tuple) and len(item) == 2 else item
        if isinstance(t, Tensor) and torch.is_complex(t):
            raise ValueError(
                f"{cls} does not support complex parameters: its statistics (norms, matrices, Hessian "
                "estimates) are defined for real tensors here; optimize torch.view_as_real(p) instead, or "
                "use an elementwise optimizer (adamw, lion, schedule_free_adamw)"
            )


def real_view(t: Tensor | None) -> Tensor | None:
    """``torch.view_as_real(t)`` for a complex tensor, else ``t`` (``None`` passes).

    Elementwise optimizers step a complex parameter as its (real, imaginary) pair, as torch's do:
    the parameter, its gradient and its state (kept complex, like the parameter) are viewed as real
    when the step gathers them.
    """
    return torch.view_as_real(t) if t is not None and torch.is_complex(t) else t


def params_with_grad(group: dict[str, Any], cls: str) -> Iterator[Tensor]:
    """The parameters of ``group`` that have a gradient, in order: the loop head every ``step`` shares.

    Raises:
        RuntimeError: a gradient is sparse (the update rules need dense tensors).
    """
    for p in group["params"]:
        if p.grad is None:
            continue
        reject_sparse_grad(p, cls)
        yield p


def reject_sparse_grad(p: Tensor, cls: str) -> None:
    """Raise ``RuntimeError`` naming ``cls`` if ``p.grad`` is sparse (the update rules need dense tensors)."""
    if p.grad.is_sparse:
        raise RuntimeError(f"{cls} does not support sparse gradients")


def ensure_kahan_comp(state: dict[str, Any], p: Tensor, kahan_sum: bool) -> None:
    """Add ``state["kahan_comp"]`` once when ``kahan_sum`` is on and ``p`` is low precision."""
    if kahan_sum and "kahan_comp" not in state:
        comp = new_kahan_comp(p)
        if comp is not None:
            state["kahan_comp"] = comp


def init_state(state: dict[str, Any], p: Tensor, *names: str, step: bool = True, kahan_sum: bool = False) -> None:
    """On first use (``names[0]`` missing): ``step = 0`` if ``step``, then zero buffers like ``p``; then Kahan.

    One place for the state layout the elementwise families share, so keys, order and dtypes agree.
    """
    if names and names[0] not in state:
        if step:
            state["step"] = 0
        for name in names:
            state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
    ensure_kahan_comp(state, p, kahan_sum)


def backfill_group_defaults(optimizer: Optimizer, **defaults: Any) -> None:
    """Give every param group the options a checkpoint from before them lacks (for ``__setstate__``)."""
    for group in optimizer.param_groups:
        for key, value in defaults.items():
            group.setdefault(key, value)


def run_closure(closure: Callable[[], Any] | None) -> Any:
    """``closure()`` with grad enabled (``step`` runs under ``no_grad``), or ``None`` without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
