"""Lookahead: k fast steps of any registered optimizer, then pull toward slow weights (Zhang et al. 2019).

Registered as ``lookahead`` (``base`` names the inner optimizer, default ``"adamw"``) and, for the
common bases, as ``lookahead_adamw``, ``lookahead_sgd``, ``lookahead_radam`` (Ranger's pairing),
``lookahead_lion`` and ``lookahead_lamb``, which take their base's hyperparameters directly plus
``k`` and ``alpha``. Names are not generated for every entry (that would double the registry and
the contract suite); ``lookahead`` with ``base=...`` reaches every other one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from lightning_opt.optim.base import OptionCheck, check_arg, check_options, is_int, is_number
from lightning_opt.optim.build import normalize_groups
from lightning_opt.optim.precision import compute_dtype
from lightning_opt.optim.registry import OptimInfo, accepted_hparams, get_optimizer_info, register, validate_hparams

__all__ = ["LOOKAHEAD_BASES", "Lookahead", "lookahead_sync_"]

#: the bases that get a ``lookahead_<name>`` registry entry
LOOKAHEAD_BASES = ("adamw", "sgd", "radam", "lion", "lamb")


def _check_k(cls: str, key: str, k: Any) -> int:
    check_arg(cls, key, k, is_int(k) and k >= 1, "it must be an integer >= 1 (fast steps per sync)")
    return k


def _check_alpha(cls: str, key: str, alpha: Any) -> float:
    check_arg(cls, key, alpha, is_number(alpha) and 0 < alpha <= 1, "it must lie in (0, 1]")
    return float(alpha)


def _as_groups(params: Any, *, lr: float, weight_decay: float) -> list[Any]:
    """``params`` as groups for the inner optimizer; a bad argument gets torch's own error."""
    if isinstance(params, torch.Tensor):
        raise TypeError(
            "params argument given to the optimizer should be an iterable of Tensors or dicts, but got "
            + torch.typename(params)
        )
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    try:
        return normalize_groups(items, lr=lr, weight_decay=weight_decay)
    except TypeError:
        return items  # a mixture torch judges: the inner optimizer raises torch's error for it


def lookahead_sync_(param: torch.Tensor, slow: torch.Tensor, *, alpha: float) -> None:
    """``slow <- slow + alpha (param - slow)``, then ``param <- slow`` (in float32 for bf16/fp16)."""
    dt = compute_dtype(param)
    s = slow.to(dt)
    s.add_(param.to(dt) - s, alpha=alpha)
    if s is not slow:
        slow.copy_(s)
    param.copy_(slow)


class Lookahead(Optimizer):
    """Run a registered optimizer on fast weights; every ``k`` steps move slow weights toward them.

    Every ``k`` steps: ``slow <- slow + alpha (fast - slow)`` and ``fast <- slow``. The model holds
    the fast weights, which equal the slow ones right after each sync, so validation at a multiple
    of ``k`` steps sees the slow weights. The inner optimizer's ``param_groups`` and ``state`` *are*
    this object's, so LR schedulers, layer decay and checkpointing work unchanged; the slow weights
    are saved in the state as ``lookahead_slow`` and the step counter in each group as
    ``lookahead_step``.

    Args:
        params: parameters, ``(name, tensor)`` pairs or param-group dicts (as ``build_optimizer``
            passes them); groups keep their own ``lr``/``weight_decay``.
        lr: base learning rate (default: the base's registry ``default_lr``).
        base: registry name of the inner optimizer (default ``"adamw"``). Schedule-free optimizers
            and those that need a callback (Sophia) are refused: their extra machinery would talk
            to the wrapper, not to the inner optimizer.
        k: fast steps between syncs, an integer >= 1 (default ``5``).
        alpha: slow-weight step size, in (0, 1] (default ``0.5``; 1 disables the pull-back).
        weight_decay: weight decay passed to the base (default ``0.0``).
        base_hparams: the base's own hyperparameters, e.g. ``{"betas": (0.9, 0.95)}`` (default none);
            validated like ``build_optimizer``'s (unknown names raise ``TypeError``).

    Raises:
        ValueError: unknown ``base``, a refused base, invalid ``k``/``alpha``/``lr``.
        TypeError: a ``base_hparams`` entry the base does not take.

    Example:
        >>> opt = Lookahead(model.parameters(), lr=1e-3, base="adamw", k=5, alpha=0.5,
        ...                 base_hparams={"betas": (0.9, 0.95)})
        >>> opt = build_optimizer(model, "lookahead_radam", lr=1e-3, k=6)  # Ranger

    Equal to ``pytorch_optimizer.Lookahead`` with ``pullback_momentum="none"`` (no pull-back
    option here). Paper: Zhang, Lucas, Hinton & Ba, "Lookahead Optimizer: k steps forward, 1 step
    back", arXiv:1907.08610.
    """

    #: the wrapper's own group options (a group may set its own k and alpha), checked by
    #: base.check_options in the constructor and in add_param_group
    option_checks: ClassVar[dict[str, OptionCheck]] = {
        "k": _check_k,
        "alpha": _check_alpha,
        "lookahead_k": _check_k,
        "lookahead_alpha": _check_alpha,
    }

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | None = None,
        *,
        base: str = "adamw",
        k: int = 5,
        alpha: float = 0.5,
        weight_decay: float = 0.0,
        base_hparams: Mapping[str, Any] | None = None,
    ) -> None:
        checked = check_options("Lookahead", {"k": k, "alpha": alpha}, checks=self.option_checks)
        k, alpha = checked["k"], checked["alpha"]
        info = get_optimizer_info(base)
        if info.cls is Lookahead or info.name.startswith("lookahead"):
            raise ValueError(f"Lookahead(base={base!r}) would nest Lookahead; pick the inner optimizer's name")
        if info.schedule_free or info.callbacks:
            raise ValueError(
                f"Lookahead(base={base!r}) is not supported: {info.name} needs "
                f"{'a train/eval switch' if info.schedule_free else 'a callback'} that would reach the wrapper, not the inner optimizer"
            )
        lr = info.default_lr if lr is None else lr
        info, kwargs = validate_hparams(base, lr=lr, weight_decay=weight_decay, hparams=dict(base_hparams or {}))
        groups = _as_groups(params, lr=lr, weight_decay=weight_decay)
        if "weight_decay" in accepted_hparams(info) or "weight_decay" in info.fixed:
            kwargs.setdefault("weight_decay", weight_decay)
        elif any(isinstance(g, dict) and g.get("weight_decay", 0.0) for g in groups):
            raise TypeError(f"Lookahead(base={base!r}): {info.name} takes no weight decay, but a param group sets one")
        self.base_optimizer: Optimizer = info.cls(groups, lr=lr, **kwargs)
        self.base = info.name
        for group in groups:  # a group's own k/alpha, checked before any group is built
            if isinstance(group, dict):
                self._check_group(group)
        defaults = {"lookahead_k": k, "lookahead_alpha": alpha, "lookahead_step": 0}
        # torch's __init__ writes the defaults into the inner optimizer's group dicts (shared below)
        super().__init__(self.base_optimizer.param_groups, defaults)
        self.defaults = {**self.base_optimizer.defaults, **defaults}
        self._share_inner()

    def _share_inner(self) -> None:
        self._shared = True
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def __getstate__(self) -> dict[str, Any]:
        # torch pickles only defaults/state/param_groups; the inner optimizer carries both
        return {"defaults": self.defaults, "base_optimizer": self.base_optimizer, "base": self.base}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        super().__setstate__(
            {
                "defaults": state["defaults"],
                "state": state["base_optimizer"].state,
                "param_groups": state["base_optimizer"].param_groups,
            }
        )
        self._share_inner()

    def __repr__(self) -> str:
        return f"Lookahead(base={self.base!r}, {self.base_optimizer!r})"

    def _check_group(self, group: dict[str, Any]) -> dict[str, Any]:
        own = {k: group[k] for k in ("lookahead_k", "lookahead_alpha") if k in group}
        group.update(check_options("Lookahead", own, checks=self.option_checks))
        return group

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer (with this wrapper's ``k``/``alpha`` unless it sets them).

        The group's own ``lookahead_k``/``lookahead_alpha`` are checked here and its other options
        by the inner optimizer, before it is added.
        """
        if not getattr(self, "_shared", False):  # Optimizer.__init__ registering the inner groups
            super().add_param_group(param_group)
            return
        if isinstance(param_group, dict):
            param_group = self._check_group(dict(param_group))
        self.base_optimizer.add_param_group(param_group)
        for key in ("lookahead_k", "lookahead_alpha", "lookahead_step"):
            self.base_optimizer.param_groups[-1].setdefault(key, self.defaults[key])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict (its hooks run), with this wrapper's state-dict hooks around it."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.base_optimizer.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the inner optimizer's state (slow weights included); a checkpoint of the bare base
        optimizer loads too: its groups get this wrapper's k/alpha and slow weights start anew.

        This wrapper's load-state-dict hooks run around the inner load (a pre-hook may return a
        replacement state dict), as torch runs an optimizer's own.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        # the inner load replaces its state and group objects; share the new ones again
        self.base_optimizer.load_state_dict(state_dict)
        self._share_inner()
        for group in self.param_groups:
            for key in ("lookahead_k", "lookahead_alpha", "lookahead_step"):
                group.setdefault(key, self.defaults[key])
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _inner_step(self, closure: Callable[[], Any] | None) -> Any:
        """The inner optimizer's step with its own step hooks but not the global ones.

        torch wraps every optimizer class's ``step`` to run the global hooks
        (``register_optimizer_step_pre_hook``) and the instance's; calling the inner ``step``
        through that wrapper would run the global hooks a second time in this wrapper's step.
        """
        inner = self.base_optimizer
        wrapped = type(inner).step
        raw = getattr(wrapped, "__wrapped__", None)
        if raw is None or not getattr(wrapped, "hooked", False):
            return inner.step(closure)
        args: tuple[Any, ...] = (inner, closure)
        kwargs: dict[str, Any] = {}
        for pre_hook in inner._optimizer_step_pre_hooks.values():
            result = pre_hook(inner, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(
                        f"{pre_hook} must return None or a tuple of (new_args, new_kwargs), got {result}"
                    )
                args, kwargs = result
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(inner).__name__}.step"):
            out = raw(*args, **kwargs)
        inner._optimizer_step_code()
        for post_hook in inner._optimizer_step_post_hooks.values():
            post_hook(inner, args, kwargs)
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One inner step (which calls ``closure`` once), then a sync in groups at a multiple of ``k``."""
        # Slow weights start as the weights before a tensor's first inner step. They enter the
        # state only once the inner optimizer has stepped the tensor, because torch's optimizers
        # initialise a tensor's state when it is empty. Without a closure the grads are known now;
        # with one (Lightning) they appear inside the inner step, so every candidate is copied.
        pending = {
            p: p.detach().clone()
            for group in self.param_groups
            for p in group["params"]
            if p.requires_grad
            and (closure is not None or p.grad is not None)
            and "lookahead_slow" not in self.state.get(p, ())
        }
        loss = self._inner_step(closure)
        for p, slow in pending.items():
            if p.grad is not None:
                self.state[p]["lookahead_slow"] = slow
        for group in self.param_groups:
            group["lookahead_step"] += 1
            if group["lookahead_step"] % group["lookahead_k"]:
                continue
            for p in group["params"]:
                state = self.state.get(p)
                if state and "lookahead_slow" in state:
                    lookahead_sync_(p, state["lookahead_slow"], alpha=group["lookahead_alpha"])
        return loss


def _lookahead_over(base: str) -> Callable[..., Lookahead]:
    def make(
        params: Iterable[Any], lr: float | None = None, *, k: int = 5, alpha: float = 0.5, **hparams: Any
    ) -> Lookahead:
        weight_decay = hparams.pop("weight_decay", 0.0)
        return Lookahead(params, lr=lr, base=base, k=k, alpha=alpha, weight_decay=weight_decay, base_hparams=hparams)

    make.__name__ = make.__qualname__ = f"lookahead_{base}"
    # the base's implementations (impl= reaches the base through hparams)
    make.impls = tuple(getattr(get_optimizer_info(base).cls, "impls", ()))
    make.base = base
    make.__doc__ = f"Lookahead over {base!r}: takes {base}'s hyperparameters plus k and alpha."
    return make


register(
    OptimInfo(
        name="lookahead",
        cls=Lookahead,
        description="Lookahead around any registered optimizer (base=..., k, alpha, base_hparams)",
        paper="Zhang, Lucas, Hinton & Ba, arXiv:1907.08610",
        default_lr=1e-3,
    )
)


def register_after_all() -> None:
    """Register ``lookahead_<base>`` for :data:`LOOKAHEAD_BASES` (called once every family is loaded)."""
    for base in LOOKAHEAD_BASES:
        info = get_optimizer_info(base)
        register(
            OptimInfo(
                name=f"lookahead_{info.name}",
                cls=_lookahead_over(info.name),
                description=f"Lookahead (k=5, alpha=0.5) around {info.name}",
                paper=f"Zhang et al., arXiv:1907.08610; {info.paper}",
                default_lr=info.default_lr,
                hparams=tuple(h for h in accepted_hparams(info) if h != "lr") + ("k", "alpha"),
                extra=info.extra,
            )
        )
