"""The multi-GPU / multi-node configs (``configs/launch/``) on 2 CPU ranks, with auto-resume.

Each rank runs ``lightning-opt fit --config <config>`` as torchrun would start it (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK`` in the environment), shrunk to a tiny model on the CPU: 2 steps that write
``last.ckpt``, then the same command with ``--ckpt_path last`` and more steps, which must resume at
step 2 with the strategy the config names (DDP, or FSDP2 through ``ModelParallelStrategy``).
``fsdp_adamw.yaml`` (Lightning's FSDPStrategy) needs a GPU: on the CPU it is only parsed.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml

from tests.distributed._harness import run_ranks

ROOT = Path(__file__).resolve().parents[2] / "configs" / "launch"
TINY = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=2",
    "--trainer.num_nodes=1",
    "--trainer.precision=32-true",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--model.init_args.n_layer=1",
    "--model.init_args.n_head=2",
    "--model.init_args.n_embd=32",
    "--model.init_args.block_size=16",
    "--data.init_args.block_size=16",
    "--data.init_args.batch_size=4",
]


class StartStep(pl.Callback):
    """Records the global step each fit starts at (a resumed fit starts where the checkpoint was)."""

    started: list[int] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        StartStep.started.append(trainer.global_step)


def _overrides(tmp: str) -> str:
    """The config's callbacks, with a checkpoint every step into ``tmp`` and the start recorder."""
    path = os.path.join(tmp, "override.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(
            {
                "trainer": {
                    "default_root_dir": tmp,
                    "callbacks": [
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"dirpath": f"{tmp}/ckpt", "save_last": True, "every_n_train_steps": 1}},
                        {"class_path": "tests.distributed.test_launch_configs.StartStep"},
                    ],
                }
            },
            f,
        )  # fmt: skip
    return path


def _launch_rank(rank: int, world_size: int, config: str, tmp: str) -> tuple[list[int], str, int]:
    from lightning_opt.cli import _cli

    os.environ.update(
        WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0", MASTER_ADDR="127.0.0.1"
    )
    os.environ.setdefault("MASTER_PORT", "29500")
    args = ["fit", "--config", config, "--config", _overrides(tmp), *TINY]
    if "model_parallel" in config:
        args.append(f"--trainer.strategy.init_args.data_parallel_size={world_size}")
    _cli([*args, "--trainer.max_steps=2"], save_config=False)
    cli = _cli([*args, "--trainer.max_steps=3", "--ckpt_path=last"], save_config=False)
    return list(StartStep.started), type(cli.trainer.strategy).__name__, cli.trainer.global_step


@pytest.mark.parametrize(
    ("config", "strategy"), [("ddp_multi_node.yaml", "DDPStrategy"), ("model_parallel_muon.yaml", "ModelParallelStrategy")]
)
def test_launch_config_runs_and_resumes_on_2_ranks(config: str, strategy: str, tmp_path: Path) -> None:
    results = run_ranks(_launch_rank, str(ROOT / config), str(tmp_path))
    for started, used, final in results:
        assert used == strategy
        assert started == [0, 2], f"the second fit must resume at step 2 from last.ckpt, started at {started}"
        assert final == 3


def test_fsdp1_config_parses_and_names_its_gpu_need() -> None:
    from lightning_opt.cli import _cli

    args = ["--config", str(ROOT / "fsdp_adamw.yaml"), "--trainer.accelerator=cpu", "--trainer.devices=1"]
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        _cli(args, run=False, save_config=False)


def test_every_launch_config_is_tested() -> None:
    assert {p.name for p in ROOT.glob("*.yaml")} == {"ddp_multi_node.yaml", "model_parallel_muon.yaml", "fsdp_adamw.yaml"}
