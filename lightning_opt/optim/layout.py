"""Guard for optimizers that need each parameter whole: refuse flat partitions swapped in behind them.

DeepSpeed ZeRO (stages 1-3, through Lightning's ``DeepSpeedStrategy``) and FSDP1 with
``use_orig_params=False`` build the optimizer first and then replace every group's ``params`` by flat
1-D partitions of the concatenated parameters. Elementwise optimizers do not notice; optimizers with
per-tensor statistics (LAMB/LARS trust ratios, StableAdamW's RMS, Adafactor's factored moments) or
whole-matrix math (Muon, SOAP, APOLLO, Shampoo, AdaLomo) would compute on slices of several
parameters at once and train silently wrong. :func:`guard_param_layout` registers a step pre-hook
that notices the swap at the first step, before anything is updated, and raises naming what works.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

__all__ = ["ParamsReplacedError", "guard_param_layout", "refuse_flat_param_strategy"]


class ParamsReplacedError(RuntimeError):
    """An optimizer that needs whole parameters found other tensors in its param groups."""


class _LayoutGuard:
    """Remembers each group's parameter shapes (not identities: a deep copy of the optimizer, e.g. a
    rollback snapshot, holds other tensors of the same shapes and is fine)."""

    def __init__(self, optimizer: Optimizer, name: str, needs: str) -> None:
        self.name, self.needs = name, needs
        self.shapes: list[list[tuple[int, ...]]] = []
        self.track(optimizer)

    def track(self, optimizer: Optimizer) -> None:
        # groups added later (add_param_group) are recorded when first seen
        for group in optimizer.param_groups[len(self.shapes) :]:
            self.shapes.append([tuple(p.shape) for p in group["params"]])

    def __call__(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.track(optimizer)
        for shapes, group in zip(self.shapes, optimizer.param_groups):
            if [tuple(p.shape) for p in group["params"]] != shapes:
                raise ParamsReplacedError(
                    f"{self.name}: the parameters in its param groups were replaced by tensors of other shapes "
                    "after it was built: DeepSpeed ZeRO (Lightning's DeepSpeedStrategy) and FSDP1 with "
                    "use_orig_params=False hand the optimizer flat 1-D partitions of several parameters, and "
                    f"{self.name} {self.needs}, so it would train silently wrong. Use FSDP2 (Lightning's "
                    f"ModelParallelStrategy) or DDP with lightning_opt's {self.name}, or DeepSpeed's own "
                    "optimizer in the DeepSpeed config"
                )


def guard_param_layout(optimizer: Optimizer, name: str, needs: str) -> None:
    """Make ``optimizer.step()`` raise :class:`ParamsReplacedError` if its parameters get swapped.

    Args:
        optimizer: the optimizer, right after ``Optimizer.__init__``.
        name: its class name, for the message.
        needs: what it computes per whole parameter, e.g. ``"takes per-tensor norms"``.
    """
    optimizer.register_step_pre_hook(_LayoutGuard(optimizer, name, needs))
    optimizer._lightning_opt_needs_whole_params = needs  # read by refuse_flat_param_strategy


# Lightning strategies that hand the optimizer flat partitions: DeepSpeed ZeRO swaps them in after the
# optimizer is built (the step guard sees that), FSDP1 builds the optimizer on its flat views already
_FLAT_PARAM_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy")


def refuse_flat_param_strategy(optimizer: Optimizer, strategy: Any) -> None:
    """Raise :class:`ParamsReplacedError` if ``strategy`` would flatten an optimizer that needs whole
    parameters (Lightning's ``FSDPStrategy``/``DeepSpeedStrategy``; ``ModelParallelStrategy`` and DDP
    keep parameters whole). Called when the optimizer is configured, before anything runs."""
    needs = getattr(optimizer, "_lightning_opt_needs_whole_params", None)
    names = {c.__name__ for c in type(strategy).__mro__}
    flat = names.intersection(_FLAT_PARAM_STRATEGIES)
    if needs is None or not flat:
        return
    name = type(optimizer).__name__
    raise ParamsReplacedError(
        f"{name} cannot run under Lightning's {flat.pop()}: it hands the optimizer flat 1-D partitions of "
        f"the parameters, and {name} {needs}, so it would train silently wrong. Use "
        f"strategy=ModelParallelStrategy() (FSDP2: parameters stay whole DTensor shards; lightning_opt's "
        f"{name} is exact there) or DDP; or keep FSDPStrategy/DeepSpeed with an elementwise optimizer "
        "(adamw, lion, sgd) or DeepSpeed's own optimizer in its config"
    )
