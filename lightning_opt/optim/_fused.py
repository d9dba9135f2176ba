"""LOMO's fused backward, shared by :class:`~lightning_opt.optim.lomo.Lomo` and :class:`~lightning_opt.optim.adalomo.AdaLomo`.

Infrastructure (registers nothing; the leading underscore keeps the family auto-importer off it).

LOMO (Lv et al. 2023) saves the gradient memory by updating each parameter inside the backward
pass, as soon as its gradient is accumulated, and freeing the gradient at once: only one gradient
is alive at a time. :class:`FusedBackward` holds the machinery both LOMO optimizers need: one
post-accumulate-grad hook per parameter (registered once, inert outside a fused pass, so an
ordinary ``backward()`` + ``step()`` still works), the refusal to run over gradients that already
exist (accumulation), and :meth:`FusedBackward._fused_pass`, which runs ``loss.backward()`` and
hands every fresh gradient to a callback before freeing it. The optimizers decide what the callback
does (update the parameter; or, for LOMO's two-pass gradient clipping, only measure the norm).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_opt.optim.base import reject_sparse_grad

__all__ = ["FusedBackward"]

#: what a fused pass does with one parameter's fresh gradient (``p.grad``), given its param group
GradFn = Callable[[Tensor, dict[str, Any]], None]


class FusedBackward:
    """Mixin (before ``torch.optim.Optimizer`` in the bases) for optimizers that update inside backward.

    Call :meth:`_init_fused` at the end of ``__init__`` and :meth:`_restore_fused` in ``__setstate__``.
    """

    def _init_fused(self) -> None:
        self._hooked: list[Tensor] = []  # parameters carrying our post-accumulate-grad hook
        self._fused_groups: dict[Tensor, dict[str, Any]] | None = None
        self._fused_fn: GradFn | None = None

    def _restore_fused(self) -> None:
        self.__dict__.setdefault("_hooked", [])
        self.__dict__.setdefault("_fused_groups", None)
        self.__dict__.setdefault("_fused_fn", None)

    def _fused_pass(self, loss: Tensor, fn: GradFn, *, retain_graph: bool = False) -> None:
        """``loss.backward(retain_graph=...)``, calling ``fn(p, group)`` on each gradient as it is ready, then freeing it.

        Raises:
            RuntimeError: some parameter already holds a gradient (accumulation is not supported), or
                more than one process (DDP/FSDP: the gradients would be used before they are reduced).
        """
        name = type(self).__name__
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                raise RuntimeError(
                    f"{name}.fused_backward runs in a single process only (world size here: {world}): it updates each "
                    "parameter inside backward, before DDP/FSDP would reduce its gradient across processes, so the "
                    "ranks would drift apart. Use backward() + step() (automatic optimization) under DDP."
                )
        # looked up per call: load_state_dict replaces the group dicts
        groups = {p: g for g in self.param_groups for p in g["params"]}  # type: ignore[attr-defined]
        if any(p.grad is not None for p in groups):
            raise RuntimeError(
                f"{name}.fused_backward: parameters already hold gradients; it updates inside backward and "
                "cannot accumulate. Call optimizer.zero_grad(set_to_none=True) first, or use backward() + step()."
            )
        hooked = {id(p) for p in self._hooked}
        for p in groups:
            if p.requires_grad and id(p) not in hooked:
                p.register_post_accumulate_grad_hook(self._fused_hook)
                self._hooked.append(p)
        self._fused_groups, self._fused_fn = groups, fn
        try:
            loss.backward(retain_graph=retain_graph)
        finally:
            self._fused_groups, self._fused_fn = None, None

    def _fused_hook(self, p: Tensor) -> None:
        groups, fn = self._fused_groups, self._fused_fn
        if groups is None or fn is None or p.grad is None or p not in groups:
            return  # an ordinary backward(): leave the gradient for step()
        reject_sparse_grad(p, type(self).__name__)
        with torch.no_grad():
            fn(p, groups[p])
        p.grad = None
