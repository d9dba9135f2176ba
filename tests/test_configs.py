"""Every YAML in configs/ and callbacks/ parses with LightningCLI and runs ``fit`` for 2 steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_opt import available_optimizers
from lightning_opt.cli import main

ROOT = Path(__file__).resolve().parents[1]
# configs/launch/ are multi-GPU/multi-node: tests/distributed/test_launch_configs.py runs them on 2 CPU ranks
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "launch" not in p.relative_to(ROOT / "configs").parts)
PRESETS = sorted((ROOT / "callbacks").glob("*.yaml"))
FAST = [
    "--trainer.max_steps=2",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.logger=false",
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
    # the recipes save last.ckpt with their own ModelCheckpoint (into tmp_path); the others save nothing
    ckpt = [] if "callbacks.ModelCheckpoint" in path.read_text() else ["--trainer.enable_checkpointing=false"]
    assert main(["fit", "--config", str(path), *FAST, *ckpt, f"--trainer.default_root_dir={tmp_path}"]) == 0


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_callback_preset_composes_with_a_config(path: Path, tmp_path: Path) -> None:
    from lightning_opt.cli import _cli

    preset = yaml.safe_load(path.read_text())
    assert set(preset) == {"trainer"} and len(preset["trainer"]) == 1, "a preset holds only trainer.callbacks"
    (key, entries), = preset["trainer"].items()
    assert key in ("callbacks", "callbacks+")
    base = ROOT / "configs" / "adamw.yaml"
    cli = _cli(
        ["--config", str(base), "--config", str(path), *FAST, "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path}"],
        run=False,
    )
    have = [f"{type(c).__module__}.{type(c).__name__}" for c in cli.trainer.callbacks]
    wanted = [e["class_path"] for e in entries]
    if key == "callbacks+":  # appends: the config's own callbacks stay
        wanted += [e["class_path"] for e in yaml.safe_load(base.read_text())["trainer"]["callbacks"]]
    for class_path in wanted:
        module, _, name = class_path.rpartition(".")
        assert any(h.endswith("." + name) for h in have), f"{class_path} missing from {have}"
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
