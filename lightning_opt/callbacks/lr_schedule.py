"""``LRSchedule``: step-exact learning-rate schedules for any optimizer, as a Lightning callback."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from lightning_opt.schedules import DecayShape, Schedule, ScheduleConfig, Shape, plateau_init, plateau_update

__all__ = ["LRSchedule"]


class LRSchedule(Callback):
    """Set every param group's lr to ``initial_lr * schedule(step)`` before each optimizer step.

    ``step`` counts optimizer steps really taken: the callback advances in an optimizer step
    post-hook, which torch runs only when the optimizer's real ``step`` runs, so gradient
    accumulation, a GradScaler inf-skip and a ``SpikeGuard`` skip leave the schedule where it was.
    Each group's lr at the first step is stored as ``group["initial_lr"]`` (saved with the optimizer)
    and multiplied, so layer-decay and ``lr_multipliers`` ratios survive. Several optimizers each
    advance on their own steps. The lr of every group is logged as ``lr-<Optimizer>[/pg<j>]``.

    ``plateau`` takes one ``ReduceLROnPlateau`` step per validation run (``on_validation_end``; the
    sanity check does not count), so with ``check_val_every_n_epoch > 1`` the epochs without
    validation neither fail nor count a stale value against ``patience``. A run without a
    validation loop steps once per training epoch on a metric logged in training.

    Every ``fit`` starts the schedule at step 0 (the state is reset in ``setup``), so one instance
    can be reused. Resume: the checkpointed state is ``{"step": ..., "steps": [...]}`` (plus the
    plateau state); the lr is recomputed from it at ``on_train_start``, never replayed, so a ``wsd``
    run can resume with a longer ``total_steps``/``max_steps`` (the stable phase grows) or with
    ``decay_start=`` (an int, or ``"now"``: the step at which the run resumes) to start its decay.

    Args:
        shape: ``constant``, ``linear``, ``cosine``, ``cosine_restarts``, ``polynomial``,
            ``inverse_sqrt``, ``exponential``, ``step``, ``multistep``, ``onecycle``, ``wsd`` or
            ``plateau`` (default ``"cosine"``).
        warmup_steps: linear warmup in optimizer steps (default 0).
        warmup_ratio: warmup as a fraction of the run, exclusive with ``warmup_steps`` (default None).
        total_steps: run length in optimizer steps (default ``trainer.estimated_stepping_batches``).
        min_lr_ratio: final/minimum multiplier in ``[0, 1]`` (default 0.0).
        decay_steps, decay_ratio: ``wsd`` decay length, in steps or as a fraction of the run.
        decay_shape: ``wsd`` decay: ``linear`` (default), ``cosine``, ``1-sqrt`` or ``exponential``.
        decay_start: ``wsd`` step at which the decay starts (default ``total_steps - decay_steps``),
            or ``"now"`` to start it where this run starts (resolved once, then checkpointed).
        warmup_init_ratio: multiplier at warmup step 0 (default 0.0; Hugging Face's WSD uses
            ``min_lr_ratio``).
        warmup_type: ``"linear"`` (default), ``"linear_inclusive"`` (``(t+1)/W``: no zero-lr first
            step) or ``"log"`` (DeepSpeed's).
        decay_offset, restart_period, period_mult, power, timescale, gamma, step_size, milestones, pct_start,
            anneal_strategy, div_factor, final_div_factor, three_phase, cycle_momentum, base_momentum,
            max_momentum, monitor, mode, factor, patience, threshold, threshold_mode, cooldown, eps:
            shape-specific options, documented in :class:`lightning_opt.schedules.ScheduleConfig`;
            one given to a shape that does not read it is an error.
        log_lr: log each group's lr every training batch (default True).

    Raises:
        ValueError: at construction, for an unknown shape (the known ones are listed), an option out
            of range or for another shape, warmup longer than the run, decay longer than what is
            left; at the start of training, for those that need the run length, an optimizer
            without momentum/betas under ``onecycle``, or a torch scheduler from
            ``configure_optimizers`` that would fight over the lr.

    Example:
        >>> trainer = pl.Trainer(max_steps=10_000, callbacks=[LRSchedule("wsd", warmup_steps=500, decay_ratio=0.2, decay_shape="1-sqrt")])

    Papers: SGDR (Loshchilov & Hutter, 2016, arXiv 1608.03983); one-cycle (Smith & Topin, 2017,
    arXiv 1708.07120); WSD (Hu et al., 2024, arXiv 2404.06395; Hägele et al., 2024, arXiv 2405.18392).
    """

    def __init__(
        self,
        shape: Shape = "cosine",
        *,
        warmup_steps: int = 0,
        warmup_ratio: float | None = None,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        decay_steps: int | None = None,
        decay_ratio: float | None = None,
        decay_shape: DecayShape = "linear",
        decay_start: int | Literal["now"] | None = None,
        warmup_init_ratio: float = 0.0,
        warmup_type: Literal["linear", "linear_inclusive", "log"] = "linear",
        decay_offset: int | None = None,
        restart_period: int | None = None,
        period_mult: int | None = None,
        power: float | None = None,
        timescale: int | None = None,
        gamma: float | None = None,
        step_size: int | None = None,
        milestones: Sequence[int] | None = None,
        pct_start: float | None = None,
        anneal_strategy: Literal["cos", "linear"] | None = None,
        div_factor: float | None = None,
        final_div_factor: float | None = None,
        three_phase: bool | None = None,
        cycle_momentum: bool | None = None,
        base_momentum: float | None = None,
        max_momentum: float | None = None,
        monitor: str | None = None,
        mode: Literal["min", "max"] | None = None,
        factor: float | None = None,
        patience: int | None = None,
        threshold: float | None = None,
        threshold_mode: Literal["rel", "abs"] | None = None,
        cooldown: int | None = None,
        eps: float | None = None,
        log_lr: bool = True,
    ) -> None:
        if decay_start is not None and not isinstance(decay_start, int) and decay_start != "now":
            raise ValueError(f"LRSchedule(decay_start={decay_start!r}) is invalid: expected a step (int) or 'now'")
        self._decay_start_now = decay_start == "now"
        if self._decay_start_now and shape != "wsd":
            raise ValueError(f"LRSchedule(decay_start='now') is invalid: only shape 'wsd' reads it, not {shape!r}")
        self.config = ScheduleConfig(
            shape=shape,
            warmup_steps=warmup_steps,
            warmup_ratio=warmup_ratio,
            total_steps=total_steps,
            min_lr_ratio=min_lr_ratio,
            warmup_init_ratio=warmup_init_ratio,
            warmup_type=warmup_type,
            decay_offset=decay_offset,
            decay_steps=decay_steps,
            decay_ratio=decay_ratio,
            decay_shape=decay_shape,
            decay_start=None if self._decay_start_now else decay_start,
            restart_period=restart_period,
            period_mult=period_mult,
            power=power,
            timescale=timescale,
            gamma=gamma,
            step_size=step_size,
            milestones=milestones,
            pct_start=pct_start,
            anneal_strategy=anneal_strategy,
            div_factor=div_factor,
            final_div_factor=final_div_factor,
            three_phase=three_phase,
            cycle_momentum=cycle_momentum,
            base_momentum=base_momentum,
            max_momentum=max_momentum,
            monitor=monitor,
            mode=mode,
            factor=factor,
            patience=patience,
            threshold=threshold,
            threshold_mode=threshold_mode,
            cooldown=cooldown,
            eps=eps,
        )
        self.log_lr = log_lr
        self.steps: list[int] = []
        self.plateau = plateau_init(self.config) if shape == "plateau" else None
        self.resolved_decay_start: int | None = None
        self.schedule: Schedule | None = None
        self._handles: list[Any] = []
        self._optimizers: list[torch.optim.Optimizer] = []

    @property
    def step(self) -> int:
        """Optimizer steps taken by the first optimizer (the schedule's position)."""
        return self.steps[0] if self.steps else 0

    # --- lifecycle ------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # a new fit starts the schedule over, so one instance can serve several fits; Lightning
        # restores a checkpoint's state (load_state_dict) after setup, so a resume still continues
        self._remove_hooks()
        self.steps = []
        self.plateau = plateau_init(self.config) if self.config.shape == "plateau" else None
        self.resolved_decay_start = None
        self.schedule = None
        self._optimizers = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_train_start runs after the checkpoint restored the optimizers and this callback's state,
        # so the lr set here is the recomputed one, not the checkpoint's stale group["lr"].
        if trainer.lr_scheduler_configs:
            raise ValueError(
                "LRSchedule sets the lr itself, but configure_optimizers also returned a torch scheduler "
                f"({type(trainer.lr_scheduler_configs[0].scheduler).__name__}); return only the optimizer"
            )
        self._remove_hooks()
        self._optimizers = list(trainer.optimizers)
        if not self._optimizers:
            raise ValueError("LRSchedule found no optimizer on the trainer")
        if not self.steps:
            self.steps = [0] * len(self._optimizers)
        elif len(self.steps) != len(self._optimizers):
            raise ValueError(
                f"LRSchedule was checkpointed with {len(self.steps)} optimizers, the model now has {len(self._optimizers)}"
            )
        self.schedule = self._resolve(trainer)
        for i, opt in enumerate(self._optimizers):
            for group in opt.param_groups:
                group.setdefault("initial_lr", float(group["lr"]))
                if self.schedule.momentum(0) is not None and "betas" not in group and "momentum" not in group:
                    raise ValueError(
                        f"LRSchedule('onecycle', cycle_momentum=True) needs an optimizer with 'momentum' or 'betas'; "
                        f"{type(opt).__name__} has neither: pass cycle_momentum=False"
                    )
            self._handles.append(opt.register_step_post_hook(functools.partial(self._after_step, i)))
            self._apply(i)

    def _resolve(self, trainer: pl.Trainer) -> Schedule:
        config = self.config
        if self._decay_start_now:
            if self.resolved_decay_start is None:
                self.resolved_decay_start = self.step
            config = dataclasses.replace(config, decay_start=self.resolved_decay_start)
        total = config.total_steps
        if total is None:
            estimated = trainer.estimated_stepping_batches
            if math.isfinite(estimated):
                total = int(estimated)
            elif config.needs_total_steps:
                raise ValueError(
                    f"LRSchedule({config.shape!r}) needs the run length but the trainer's is unbounded; "
                    "set trainer.max_steps or LRSchedule(total_steps=...)"
                )
        return config.resolve(total)

    def _after_step(self, i: int, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.steps[i] += 1
        self._apply(i)

    def multiplier(self, i: int = 0) -> float:
        """The current lr multiplier of optimizer ``i``."""
        if self.schedule is None:
            raise RuntimeError("LRSchedule.multiplier is known once training has started")
        m = self.schedule(self.steps[i])
        if self.plateau is not None:
            m *= self.plateau["scale"]
        return m

    def _apply(self, i: int) -> None:
        m = self.multiplier(i)
        momentum = self.schedule.momentum(self.steps[i])
        for group in self._optimizers[i].param_groups:
            lr = group["initial_lr"] * m
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
            if momentum is not None:
                if "betas" in group:
                    group["betas"] = (momentum, *group["betas"][1:])
                else:
                    group["momentum"] = momentum

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.log_lr:
            return
        names = [type(o).__name__ for o in self._optimizers]
        metrics = {}
        for i, opt in enumerate(self._optimizers):
            name = f"lr-{names[i]}" + (f"-{i}" if names.count(names[i]) > 1 else "")
            for j, group in enumerate(opt.param_groups):
                metrics[name if len(opt.param_groups) == 1 else f"{name}/pg{j + 1}"] = float(group["lr"])
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # one plateau step per validation run, when the monitored value is fresh; the sanity check
        # and a standalone trainer.validate() are not part of the schedule
        if self.plateau is None or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self._plateau_step(trainer, "validation run")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # without a validation loop, step on a metric logged in training, once per epoch
        if self.plateau is None or trainer.enable_validation:
            return
        self._plateau_step(trainer, "epoch (this run has no validation loop)")

    def _plateau_step(self, trainer: pl.Trainer, when: str) -> None:
        monitor = self.config.option("monitor")
        if monitor not in trainer.callback_metrics:
            raise ValueError(
                f"LRSchedule('plateau') monitors {monitor!r}, which was not logged this {when}; "
                f"logged: {sorted(trainer.callback_metrics)}"
            )
        self.plateau = plateau_update(self.config, self.plateau, float(trainer.callback_metrics[monitor]))
        for i in range(len(self._optimizers)):
            self._apply(i)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # --- checkpoint -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"step": self.step, "steps": list(self.steps)}
        if self.plateau is not None:
            state["plateau"] = dict(self.plateau)
        if self.resolved_decay_start is not None:
            state["decay_start"] = self.resolved_decay_start
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # "steps" came after "step": an old checkpoint holds one optimizer's count
        self.steps = list(state_dict.get("steps", [int(state_dict["step"])]))
        if self.plateau is not None and "plateau" in state_dict:
            self.plateau = dict(state_dict["plateau"])
        if self._decay_start_now:
            self.resolved_decay_start = state_dict.get("decay_start")
        if self.schedule is not None and len(self.steps) == len(self._optimizers):
            # loaded mid-run (a SpikeGuard rollback): the lr follows the restored step at once
            for i in range(len(self._optimizers)):
                self._apply(i)
