"""``SpikeGuard``: detect loss / gradient-norm spikes before the optimizer step, then skip, clip, roll back or raise."""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.optim import Optimizer

from lightning_opt.callbacks._sharding import reshard_fsdp
from lightning_opt.callbacks.gradient_monitor import global_grad_norm

__all__ = ["RunningStats", "SpikeError", "SpikeGuard"]

Metric = Literal["loss", "grad_norm", "both"]
Action = Literal["skip", "clip", "rollback", "raise"]
Mode = Literal["zscore", "ratio"]


class SpikeError(RuntimeError):
    """Raised by ``SpikeGuard(action="raise")``; ``.record`` is the spike's record."""

    def __init__(self, message: str, record: dict[str, Any]) -> None:
        super().__init__(message)
        self.record = record


class RunningStats:
    """Running mean and variance of a scalar series: exact over a warm-up, then exponential.

    The first ``max(warmup, 1)`` values are averaged exactly (Welford), so the statistics do not
    depend on a starting guess; afterwards ``mean`` and ``var`` are exponentially weighted with
    ``decay`` (West 1979: ``d = x - mean; mean += (1 - decay) d; var = decay (var + (1 - decay) d^2)``),
    so they follow a loss that keeps falling. The statistics are :attr:`ready` to judge once they hold
    ``max(warmup, 1)`` values: with ``warmup=0`` the first value is taken as the mean (an empty
    mean of 0 would make every value a spike, and spikes never enter the statistics).
    """

    def __init__(self, warmup: int, decay: float) -> None:
        self.warmup = warmup
        self.decay = decay
        self.count = 0
        self.mean = 0.0
        self.var = 0.0

    @property
    def ready(self) -> bool:
        """True once ``max(warmup, 1)`` values were seen: empty statistics judge nothing."""
        return self.count >= max(self.warmup, 1)

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    def update(self, x: float) -> None:
        if self.count < max(self.warmup, 1):
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            # population variance of the warm-up values
            self.var += (delta * (x - self.mean) - self.var) / self.count
            return
        self.count += 1
        delta = x - self.mean
        incr = (1.0 - self.decay) * delta
        self.mean += incr
        self.var = self.decay * (self.var + delta * incr)

    def score(self, x: float, mode: Mode) -> float:
        """How far ``x`` is above normal: a z-score, or the ratio to the mean."""
        if mode == "ratio":
            return x / self.mean if self.mean > 0 else math.inf
        # floor: a series that has been flat to 1e-3 of its level does not make noise a spike
        std = max(self.std, 1e-3 * abs(self.mean), 1e-12)
        return (x - self.mean) / std

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state.get("count", 0))
        self.mean = float(state.get("mean", 0.0))
        self.var = float(state.get("var", 0.0))


def _clone_tree(obj: Any) -> Any:
    """Deep copy in which every tensor is a fresh clone (``load_state_dict`` may alias what it gets)."""
    return copy.deepcopy(obj)


class SpikeGuard(Callback):
    """Catch a loss or gradient-norm spike before the optimizer applies it, and skip, clip, roll back or raise.

    How it sees the step. At the start of training the guard replaces ``optimizer.step`` of the
    Trainer's optimizer by a wrapper (an instance attribute; removed at the end of ``fit``).
    Lightning calls ``optimizer.step(closure=...)`` on that raw optimizer (through the strategy and
    precision plugin), so the wrapper runs the closure (forward, backward, and inside it
    ``on_before_optimizer_step``, where the guard measures the gradient norm after AMP unscaling
    and before clipping), then decides. With a fp16 ``GradScaler`` the plugin runs the closure
    itself and ``scaler.step`` calls the wrapper without one; the scaler already skips inf/NaN
    gradients there, so the guard only sees finite ones. The loss is taken in
    ``on_before_backward`` (divided back by the GradScaler's scale), summed over the micro-batches
    of a gradient-accumulation window: the mean micro-batch loss of the step.

    Detection. For each watched metric (``metric``: the loss, the global gradient norm, or both)
    the guard keeps :class:`RunningStats`: an exact mean/variance over the first ``warmup_steps``
    steps, then an exponential moving mean/variance with ``ema_decay``. After the warm-up a value is
    a spike when ``(x - mean) / std > threshold`` (``mode="zscore"``; ``std`` is floored at 1e-3 of
    the mean) or ``x / mean > threshold`` (``mode="ratio"``). A non-finite value is always a spike,
    warm-up or not. Spikes do not enter the statistics (a clipped step enters with its clipped norm,
    as in ZClip).

    Actions on a spike:

    - ``"skip"``: the real ``optimizer.step`` is not called, so parameters and optimizer state stay
      bit-identical and the optimizer's step post-hooks (hence ``LRSchedule``) do not run.
      ``trainer.global_step`` still counts the batch.
    - ``"clip"``: gradients are scaled to norm ``mean + threshold * std`` of the running gradient
      norm (``mean * threshold`` in ratio mode) and the step is taken (ZClip, arXiv 2504.02507, with
      the plain ``mean + k std`` target); a non-finite gradient cannot be clipped and is skipped.
      Needs ``metric="grad_norm"``.
    - ``"rollback"``: spikes are skipped until ``patience`` come in a row; then the model, every
      optimizer's state, the GradScaler and the state of every other stateful callback (e.g.
      ``LRSchedule``'s step) are restored from the last snapshot, and training continues with the
      next batches, past the offending ones (PaLM, arXiv 2204.02311, section 5.1). Snapshots are taken
      at the first step of training (before it is judged, once every callback has started) and after
      every ``snapshot_every_n_steps`` steps really taken; they are kept in memory (a full copy of
      parameters and optimizer state on their device) or, with ``snapshot_dir``, on disk
      (``spike_guard_rank<r>.pt``).
    - ``"raise"``: spikes are skipped until ``patience`` come in a row; then :class:`SpikeError`.

    Every spike is appended to :attr:`spikes` as ``{"step", "epoch", "batch_idx", "loss",
    "grad_norm", "action"}`` (``step`` is ``trainer.global_step`` when the spike happened, ``batch_idx``
    the last batch of the step, non-finite values as ``inf``) and, on rank 0, rewritten to
    ``<trainer.log_dir>/<filename>`` so the bad batches can be found later.

    Distributed. The loss is all-reduced with MAX over ranks before the decision, together with the
    gradient norm (already global: DDP all-reduces gradients, DTensor shards are reduced in
    ``global_grad_norm``). Every rank then holds the same numbers and statistics and takes the same
    decision, and a spike on one rank (undiluted by the max) makes every rank skip or roll back, so
    replicas never diverge. One small all-reduce and one host sync per step.

    The statistics, spikes and streak round-trip through ``state_dict`` / ``load_state_dict``
    (a Lightning checkpoint); snapshots do not (a resumed run takes a fresh one at its first step).

    Args:
        metric: what to watch: ``"loss"`` (default), ``"grad_norm"``, or ``"both"`` (a spike in either).
        action: ``"skip"`` (default), ``"clip"``, ``"rollback"`` or ``"raise"``.
        threshold: z-score (default 6.0) or ratio above which a value is a spike.
        mode: ``"zscore"`` (default) or ``"ratio"`` (for positive metrics; needs ``threshold > 1``).
        warmup_steps: steps whose values only build the statistics (default 25); only non-finite
            values are spikes before that. ``0`` still takes the first step's value as the mean and
            judges from the second step on.
        ema_decay: decay of the moving mean and variance after the warm-up, in (0, 1) (default 0.97).
        patience: spikes in a row that trigger ``"rollback"`` / ``"raise"``; the earlier ones of
            the streak are skipped (default 1). Only for those two actions.
        snapshot_every_n_steps: steps between rollback snapshots (default 100). Only for ``"rollback"``.
        snapshot_dir: directory for on-disk snapshots instead of memory (default ``None``).
            Only for ``"rollback"``.
        filename: name of the JSON record in ``trainer.log_dir`` (default ``"spikes.json"``);
            ``None`` writes no file.

    Raises:
        ValueError: unknown ``metric``/``action``/``mode``, a non-positive ``threshold`` (or
            ``<= 1`` in ratio mode), negative ``warmup_steps``, ``ema_decay`` outside (0, 1),
            ``patience < 1``, ``snapshot_every_n_steps < 1``, an option given for an action that
            does not use it, ``action="clip"`` with a metric other than ``"grad_norm"``; at fit start, more than one
            optimizer, or manual optimization (``automatic_optimization = False``: Lightning's
            ``opt.step()`` then hands the optimizer a closure that returns no loss, so there is nothing
            to judge).
        SpikeError: ``action="raise"`` after ``patience`` spikes in a row.

    Example:
        >>> guard = SpikeGuard(metric="both", action="skip", threshold=6.0, warmup_steps=25)
        >>> trainer = L.Trainer(callbacks=[guard])
        >>> trainer.fit(model)
        >>> guard.spikes  # [{'step': 812, 'epoch': 0, 'batch_idx': 812, 'loss': 9.1e3, ...}]
    """

    def __init__(
        self,
        *,
        metric: Metric = "loss",
        action: Action = "skip",
        threshold: float = 6.0,
        mode: Mode = "zscore",
        warmup_steps: int = 25,
        ema_decay: float = 0.97,
        patience: int = 1,
        snapshot_every_n_steps: int = 100,
        snapshot_dir: str | None = None,
        filename: str | None = "spikes.json",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for arg, value, allowed in (("metric", metric, Metric), ("action", action, Action), ("mode", mode, Mode)):
            if value not in get_args(allowed):
                raise ValueError(f"{name}({arg}={value!r}) is invalid; expected one of {get_args(allowed)}")
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not math.isfinite(threshold)
            or threshold <= 0
        ):
            raise ValueError(f"{name}(threshold={threshold!r}) is invalid; it must be a finite number > 0")
        if mode == "ratio" and threshold <= 1:
            raise ValueError(f"{name}(threshold={threshold!r}, mode='ratio') is invalid; a ratio threshold must be > 1")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"{name}(warmup_steps={warmup_steps!r}) is invalid; it must be an integer >= 0")
        if not isinstance(ema_decay, (int, float)) or not 0 < ema_decay < 1:
            raise ValueError(f"{name}(ema_decay={ema_decay!r}) is invalid; it must lie in (0, 1), e.g. 0.97")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"{name}(patience={patience!r}) is invalid; it must be an integer >= 1")
        if (
            isinstance(snapshot_every_n_steps, bool)
            or not isinstance(snapshot_every_n_steps, int)
            or snapshot_every_n_steps < 1
        ):
            raise ValueError(
                f"{name}(snapshot_every_n_steps={snapshot_every_n_steps!r}) is invalid; it must be an integer >= 1"
            )
        if patience != 1 and action not in ("rollback", "raise"):
            raise ValueError(
                f"{name}(patience={patience}) only applies to action='rollback' or 'raise', not {action!r}"
            )
        if action != "rollback" and (snapshot_every_n_steps != 100 or snapshot_dir is not None):
            raise ValueError(
                f"{name}: snapshot_every_n_steps and snapshot_dir only apply to action='rollback', not {action!r}"
            )
        if action == "clip" and metric != "grad_norm":
            raise ValueError(
                f"{name}(action='clip') clips gradients to the running gradient norm; use metric='grad_norm', not {metric!r}"
            )
        self.metric = metric
        self.action = action
        self.threshold = float(threshold)
        self.mode = mode
        self.warmup_steps = warmup_steps
        self.ema_decay = float(ema_decay)
        self.patience = patience
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.snapshot_dir = snapshot_dir
        self.filename = filename

        self.spikes: list[dict[str, Any]] = []
        self.stats = {
            "loss": RunningStats(warmup_steps, self.ema_decay),
            "grad_norm": RunningStats(warmup_steps, self.ema_decay),
        }
        self.consecutive = 0
        self._watch_loss = metric in ("loss", "both")
        self._watch_grad = metric in ("grad_norm", "both")

        self._trainer: pl.Trainer | None = None
        self._module: pl.LightningModule | None = None
        self._optimizer: Optimizer | None = None
        self._loss_acc: Tensor | None = None
        self._loss: Tensor | None = None
        self._grad_norm: Tensor | None = None
        self._batch_idx = -1
        self._steps_taken = 0
        self._snapshot: dict[str, Any] | None = None
        self._log_dir: str | None = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "stats": {k: s.state_dict() for k, s in self.stats.items()},
            "spikes": copy.deepcopy(self.spikes),
            "consecutive": self.consecutive,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, stats in self.stats.items():
            stats.load_state_dict(state_dict.get("stats", {}).get(key, {}))
        self.spikes = copy.deepcopy(list(state_dict.get("spikes", [])))
        self.consecutive = int(state_dict.get("consecutive", 0))

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"SpikeGuard guards exactly one optimizer; this run has {len(trainer.optimizers)}")
        if not pl_module.automatic_optimization:
            raise ValueError(
                "SpikeGuard needs automatic optimization: under manual optimization (automatic_optimization=False) "
                "opt.step() runs a closure that returns no loss, so no spike could be seen; remove the callback "
                "or return the loss from training_step and let Lightning step"
            )
        self._trainer, self._module = trainer, pl_module
        self._optimizer = trainer.optimizers[0]
        # read on every rank: Trainer.log_dir broadcasts from rank 0 (a collective)
        self._log_dir = trainer.log_dir if self.filename is not None else None
        self._install(self._optimizer)
        self._steps_taken = 0
        # the first snapshot is taken at the first guarded step, once every callback has run its
        # on_train_start (a callback listed after this one, e.g. LRSchedule, has no state before that)
        self._snapshot = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._uninstall()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._uninstall()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        loss = loss.detach().float()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            # MixedPrecision.pre_backward scales the loss before this hook
            loss = loss / scaler.get_scale()
        self._loss_acc = loss if self._loss_acc is None else self._loss_acc + loss

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        # inside the closure: after backward and AMP unscaling, before Lightning's gradient clipping
        self._loss, self._loss_acc = self._loss_acc, None
        if self._watch_grad:
            self._grad_norm = global_grad_norm(p for group in optimizer.param_groups for p in group["params"])

    # ------------------------------------------------------------------ the step guard
    def _install(self, optimizer: Optimizer) -> None:
        if "step" in optimizer.__dict__:
            raise RuntimeError("SpikeGuard: optimizer.step is already replaced on this instance (two SpikeGuards?)")
        real_step = optimizer.step  # bound method, with torch's step hooks

        def guarded_step(closure: Any = None, **kwargs: Any) -> Any:
            if self.action == "rollback" and self._snapshot is None:
                self._take_snapshot()
            result = None
            if closure is not None:
                with torch.enable_grad():
                    result = closure()
                if result is None:
                    # training_step returned None: Lightning skipped backward, there is nothing to judge
                    self._loss = self._grad_norm = None
                    return real_step(closure=(lambda: None), **kwargs)
            if not self._decide_and_act():
                return result
            # the closure already ran: hand the optimizer its result instead of running it twice
            out = real_step(closure=(lambda: result), **kwargs) if closure is not None else real_step(**kwargs)
            self._after_real_step()
            return out

        optimizer.step = guarded_step  # type: ignore[method-assign]

    def _uninstall(self) -> None:
        if self._optimizer is not None:
            self._optimizer.__dict__.pop("step", None)
        self._optimizer = None

    def _gather(self) -> tuple[float, float]:
        """(loss, grad_norm) identical on every rank: max over ranks, non-finite mapped to +inf. One host sync."""
        dev = (
            self._grad_norm.device
            if self._grad_norm is not None
            else (self._loss.device if self._loss is not None else "cpu")
        )
        loss = self._loss if self._loss is not None else torch.zeros((), device=dev)
        gnorm = self._grad_norm if self._grad_norm is not None else torch.zeros((), device=dev)
        packet = torch.stack([loss.to(dev).float(), gnorm.float()])
        packet = torch.where(torch.isfinite(packet), packet, torch.full_like(packet, math.inf))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packet, op=dist.ReduceOp.MAX)
        values = packet.tolist()
        self._loss = self._grad_norm = None
        return values[0], values[1]

    def _is_spike(self, key: str, x: float) -> bool:
        if not math.isfinite(x):
            return True
        stats = self.stats[key]
        return stats.ready and stats.score(x, self.mode) > self.threshold

    def _decide_and_act(self) -> bool:
        """Return True when the real step is to be taken (gradients possibly clipped)."""
        loss, gnorm = self._gather()
        spike_loss = self._watch_loss and self._is_spike("loss", loss)
        spike_grad = self._watch_grad and self._is_spike("grad_norm", gnorm)
        if not (spike_loss or spike_grad):
            self.consecutive = 0
            self._observe(loss, gnorm)
            return True

        self.consecutive += 1
        action = self.action
        if action == "clip" and not math.isfinite(gnorm):
            action = "skip"  # a non-finite gradient cannot be scaled to a finite norm
        if action in ("rollback", "raise") and self.consecutive < self.patience:
            action = "skip"
        record = self._record(loss, gnorm, action)

        if action == "clip":
            stats = self.stats["grad_norm"]
            target = stats.mean * self.threshold if self.mode == "ratio" else stats.mean + self.threshold * stats.std
            self._scale_grads(target / gnorm)
            self._observe(None, target)  # ZClip feeds the clipped norm to the statistics
            return True
        if action == "raise":
            raise SpikeError(f"SpikeGuard: {self.consecutive} spike(s) in a row: {record}", record)
        if action == "rollback":
            self._restore_snapshot()
            self.consecutive = 0
        return False

    def _after_real_step(self) -> None:
        self._steps_taken += 1
        if self.action == "rollback" and self._steps_taken % self.snapshot_every_n_steps == 0:
            self._take_snapshot()

    def _observe(self, loss: float | None, gnorm: float | None) -> None:
        if self._watch_loss and loss is not None:
            self.stats["loss"].update(loss)
        if self._watch_grad and gnorm is not None:
            self.stats["grad_norm"].update(gnorm)

    def _scale_grads(self, factor: float) -> None:
        assert self._optimizer is not None  # set in on_train_start, before any step
        for group in self._optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(factor)

    def _record(self, loss: float, gnorm: float, action: str) -> dict[str, Any]:
        trainer = self._trainer
        record = {
            "step": int(trainer.global_step) if trainer is not None else -1,
            "epoch": int(trainer.current_epoch) if trainer is not None else -1,
            "batch_idx": int(self._batch_idx),
            "loss": loss,
            "grad_norm": gnorm if self._watch_grad else None,
            "action": action,
        }
        self.spikes.append(record)
        self._write_file()
        return record

    def _write_file(self) -> None:
        trainer = self._trainer
        if self.filename is None or trainer is None or not trainer.is_global_zero:
            return
        log_dir = self._log_dir
        if log_dir is None:
            return
        os.makedirs(log_dir, exist_ok=True)
        path = os.path.join(log_dir, self.filename)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.spikes, f, indent=1)
        os.replace(tmp, path)

    # ------------------------------------------------------------------ snapshots
    def _snapshot_path(self) -> str:
        rank = self._trainer.global_rank if self._trainer is not None else 0
        return os.path.join(self.snapshot_dir, f"spike_guard_rank{rank}.pt")  # type: ignore[arg-type]

    def _take_snapshot(self) -> None:
        trainer, module = self._trainer, self._module
        assert trainer is not None and module is not None
        snap: dict[str, Any] = {
            "model": {k: v.detach().clone() for k, v in module.state_dict().items()},
            "optimizers": [_clone_tree(opt.state_dict()) for opt in trainer.optimizers],
            "callbacks": {},
            "scaler": None,
            "steps_taken": self._steps_taken,
        }
        for i, cb in enumerate(trainer.callbacks):
            if cb is self:
                continue
            state = cb.state_dict()
            if state:
                snap["callbacks"][i] = _clone_tree(state)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            snap["scaler"] = copy.deepcopy(scaler.state_dict())
        if self.snapshot_dir is not None:
            os.makedirs(self.snapshot_dir, exist_ok=True)
            torch.save(snap, self._snapshot_path())
            self._snapshot = {"on_disk": True}
        else:
            self._snapshot = snap

    def _restore_snapshot(self) -> None:
        trainer, module = self._trainer, self._module
        assert trainer is not None and module is not None and self._snapshot is not None
        if self._snapshot.get("on_disk"):
            snap = torch.load(self._snapshot_path(), weights_only=False)
        else:
            # clones: Optimizer.load_state_dict keeps the very tensors it is given as its state
            snap = _clone_tree(self._snapshot)
        module.load_state_dict(snap["model"])
        reshard_fsdp(module)  # FSDP2 may hold gathered copies of the old parameters
        # the snapshot cadence counts from the restored step
        self._steps_taken = int(snap["steps_taken"])
        for opt, state in zip(trainer.optimizers, snap["optimizers"]):
            opt.load_state_dict(state)
        for i, state in snap["callbacks"].items():
            trainer.callbacks[i].load_state_dict(state)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and snap["scaler"] is not None:
            scaler.load_state_dict(snap["scaler"])
