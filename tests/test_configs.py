"""Every YAML in configs/ and callbacks/ parses with LightningCLI and runs ``fit`` for 2 steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_opt import available_optimizers
from lightning_opt.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
PRESETS = sorted((ROOT / "callbacks").glob("*.yaml"))
FAST = [
    "--trainer.max_steps=2",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def test_every_registered_optimizer_has_a_config() -> None:
    top = {p.stem for p in (ROOT / "configs").glob("*.yaml")}
    assert top == set(available_optimizers()), "run python examples/make_configs.py"
    for name in top:
        cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        assert cfg["model"]["init_args"]["optimizer"]["name"] == name


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_runs_fit(path: Path, tmp_path: Path) -> None:
    assert main(["fit", "--config", str(path), *FAST, f"--trainer.default_root_dir={tmp_path}"]) == 0


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_callback_preset_composes_with_a_config(path: Path, tmp_path: Path) -> None:
    preset = yaml.safe_load(path.read_text())
    assert set(preset) == {"trainer"} and set(preset["trainer"]) == {"callbacks"}, "a preset holds only trainer.callbacks"
    args = ["fit", "--config", str(ROOT / "configs" / "adamw.yaml"), "--config", str(path)]
    assert main([*args, *FAST, f"--trainer.default_root_dir={tmp_path}"]) == 0
