"""``ScheduleFreeMode``: keep schedule-free optimizers in the right mode around every loop."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim import Optimizer

from lightning_opt.callbacks._sharding import reshard_fsdp

__all__ = ["ScheduleFreeMode", "is_schedule_free"]


def is_schedule_free(optimizer: Any) -> bool:
    """Whether ``optimizer`` keeps schedule-free train/eval sequences (``train()``/``eval()`` and a
    ``train_mode`` flag in every param group), ours or the ``schedulefree`` package's."""
    return (
        isinstance(optimizer, Optimizer)
        and callable(getattr(optimizer, "train", None))
        and callable(getattr(optimizer, "eval", None))
        and bool(optimizer.param_groups)
        and all("train_mode" in g for g in optimizer.param_groups)
    )


class ScheduleFreeMode(Callback):
    """Switch schedule-free optimizers to eval (averaged weights ``x``) outside training steps.

    A schedule-free optimizer (``schedule_free_adamw``/``_sgd``/``_radam``) trains at ``y`` but its
    answer is the average ``x``. This callback calls ``optimizer.eval()`` (parameters become ``x``)
    when validation, test or predict starts, when a checkpoint is saved and when training ends, and
    ``optimizer.train()`` (parameters become ``y``) right before each training batch. So:

    - validation/test/predict metrics are those of ``x``;
    - a checkpoint holds ``x`` as the model weights and the optimizer state in eval mode, which is
      consistent: resuming turns the weights back into ``y`` at the first training batch, exactly as
      the uninterrupted run does after the save (the save itself puts the live model in eval mode
      until the next batch, so both runs take the same arithmetic and match bit for bit);
    - after ``trainer.fit`` the model holds ``x``; call ``optimizer.train()`` before stepping it by hand.

    ``OptimizerMixin`` adds this callback automatically when a schedule-free optimizer is chosen.
    Other optimizers are left alone.

    Caveats: BatchNorm running statistics are accumulated at ``y``; recompute them at ``x`` (a few
    training batches under ``torch.no_grad()`` in ``model.train()``) before evaluating such a model.
    ``ModelCheckpoint(save_weights_only=True)`` does not call callbacks, so its files hold ``y``
    (a warning says so); use full checkpoints.

    Example:
        >>> trainer = Trainer(callbacks=[ScheduleFreeMode()])  # or let OptimizerMixin add it

    Paper: Defazio et al., "The Road Less Scheduled", arXiv:2405.15682 (Section "Practical details":
    evaluate and save at ``x``).
    """

    @staticmethod
    def _optimizers(trainer: pl.Trainer) -> list[Optimizer]:
        return [opt for opt in trainer.optimizers if is_schedule_free(opt)]

    def _eval(self, trainer: pl.Trainer) -> bool:
        switched = False
        for opt in self._optimizers(trainer):
            if any(g["train_mode"] for g in opt.param_groups):
                opt.eval()
                switched = True
        if switched:
            reshard_fsdp(trainer.lightning_module)
        return switched

    def _train(self, trainer: pl.Trainer) -> None:
        switched = False
        for opt in self._optimizers(trainer):
            if not all(g["train_mode"] for g in opt.param_groups):
                opt.train()
                switched = True
        if switched:  # a validation forward may have left FSDP2's gathered x in place
            reshard_fsdp(trainer.lightning_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if any(isinstance(cb, ModelCheckpoint) and cb.save_weights_only for cb in trainer.callbacks):
            rank_zero_warn(
                "ScheduleFreeMode: ModelCheckpoint(save_weights_only=True) skips callbacks, so those "
                "files hold the training point y, not the averaged weights x; save full checkpoints"
            )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._train(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval(trainer)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval(trainer)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval(trainer)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not self._eval(trainer):
            return  # already in eval mode: the checkpoint holds x and says so
        # Lightning collected the weights and optimizer states before calling this hook; collect
        # them again at x (cloned: the next training batch turns the live parameters back into y)
        checkpoint["state_dict"] = {
            k: v.detach().clone() for k, v in trainer.strategy.lightning_module_state_dict().items()
        }
        if "optimizer_states" in checkpoint:
            for i, opt in enumerate(trainer.optimizers):
                if is_schedule_free(opt):
                    checkpoint["optimizer_states"][i] = trainer.strategy.optimizer_state(opt)
