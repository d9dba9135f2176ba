"""The ``lightning-opt`` command: ``demo``, ``list``, and LightningCLI's ``fit``/``validate``/``test``.

``lightning-opt fit --config configs/lion.yaml`` runs LightningCLI in subclass mode, so a config
names its model and data classes (``class_path``) and may add callbacks such as
``lightning_opt.callbacks.LRSchedule`` under ``trainer.callbacks``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["OptCLI", "demo", "main"]

_USAGE = """usage: lightning-opt COMMAND [ARGS]

commands:
  demo            train the tiny GPT on the Python stdlib sources on CPU (about a minute) and print
                  the validation loss before and after; LightningCLI flags pass through, e.g.
                  lightning-opt demo --model.init_args.optimizer.name=lion
  list            print every registered optimizer with its default lr and description
  plot-schedule   write a PNG of an LR schedule (lightning-opt plot-schedule --help)
  fit|validate|test|predict
                  LightningCLI, e.g. lightning-opt fit --config configs/adamw.yaml
"""

DEMO_DEFAULTS = [
    "--model=lightning_opt.demo.TinyGPT",
    "--data=lightning_opt.demo.CharDataModule",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.max_steps=2000",
    "--trainer.val_check_interval=500",
    "--trainer.limit_val_batches=8",
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.gradient_clip_val=1.0",
    "--seed_everything=0",
]


def _resume_in_the_last_run(trainer: Any) -> None:
    """Before ``fit --ckpt_path last``: point checkpoint callbacks at the newest ``last*.ckpt`` of earlier runs.

    With a versioned logger (the default) a restarted process logs to a new ``version_N+1`` and a
    ``ModelCheckpoint`` without ``dirpath`` would look for ``last.ckpt`` only there, find nothing and
    silently start over; so each such callback gets the directory of the newest ``last*.ckpt`` under
    the logger's earlier versions (it keeps saving there; the new logs go to the new version).
    """
    from pathlib import Path

    from lightning.pytorch.callbacks import ModelCheckpoint

    if not trainer.loggers or getattr(trainer.loggers[0], "_version", None) is not None:
        return  # no logger (default_root_dir/checkpoints) or a fixed version: the directory is stable
    logger = trainer.loggers[0]
    save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
    if "://" in str(save_dir):
        return
    lasts = list((Path(save_dir) / str(logger.name)).glob("version_*/checkpoints/last*.ckpt"))
    if not lasts:
        return
    newest = str(max(lasts, key=lambda p: p.stat().st_mtime).parent)
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = newest


def _cli(args: Sequence[str], *, run: bool = True, save_config: bool = True) -> Any:
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    class _OptLightningCLI(LightningCLI):
        def before_fit(self) -> None:
            if self.config[self.subcommand].get("ckpt_path") == "last":
                _resume_in_the_last_run(self.trainer)

    # ``args`` is the whole command line (main() took it from sys.argv or was given it), so
    # LightningCLI must not also see sys.argv: with both it warns that they may disagree
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return _OptLightningCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_callback=SaveConfigCallback if save_config else None,
            save_config_kwargs={"overwrite": True},
            run=run,
            args=list(args),
        )
    finally:
        sys.argv = argv


OptCLI = _cli


def demo(argv: Sequence[str] = ()) -> tuple[float, float]:
    """Train the tiny GPT and return (validation loss before, validation loss after)."""
    import torch

    torch.set_float32_matmul_precision("high")
    cli = _cli([*DEMO_DEFAULTS, *argv], run=False, save_config=False)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    opt = model.optimizer_config() if hasattr(model, "optimizer_config") else None
    start = trainer.validate(model, datamodule=data, verbose=False)[0]["val_loss"]
    trainer.fit(model, datamodule=data)
    end = trainer.validate(model, datamodule=data, verbose=False)[0]["val_loss"]
    name = f"{opt.name} (lr {opt.resolved_lr():g})" if opt is not None else type(model).__name__
    print(f"\nlightning-opt demo: {name}, {trainer.global_step} steps")
    print(f"validation loss at the start: {start:.4f} nats/byte")
    print(f"validation loss at the end:   {end:.4f} nats/byte")
    return start, end


def _list() -> None:
    from lightning_opt.optim.registry import available_optimizers, get_optimizer_info

    for name in available_optimizers():
        info = get_optimizer_info(name)
        print(f"{name:24s} lr={info.default_lr:<8g} {info.description}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-opt`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_USAGE)
        return 0
    command, rest = args[0], args[1:]
    if command == "demo":
        demo(rest)
    elif command == "list":
        _list()
    elif command == "plot-schedule":
        from lightning_opt.schedules import plot_schedule_main

        return int(plot_schedule_main(rest) or 0)
    elif command in ("fit", "validate", "test", "predict"):
        _cli(args)
    else:
        print(f"lightning-opt: unknown command {command!r}\n\n{_USAGE}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
