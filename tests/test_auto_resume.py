"""``lightning-opt fit --ckpt_path last`` after a SIGKILL equals the uninterrupted run, bit for bit.

A tiny demo fit runs in a subprocess with ``ModelCheckpoint(save_last=True, every_n_train_steps=5)``
and a versioned CSVLogger (the case where a restart logs to a new ``version_1`` and Lightning alone
would not find ``last.ckpt``); it is killed with SIGKILL at step 12 (after the step-10 checkpoint),
rerun with ``--ckpt_path last`` to the end, and compared with a run that was never interrupted:
weights, optimizer state and every callback's state are equal exactly (same CPU, same kernels).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_opt.cli import main

ROOT = Path(__file__).resolve().parents[1]
KILL_AT = 12
MAX_STEPS = 20  # 16 steps per epoch: the resumed run also crosses an epoch boundary

CONFIG = f"""
seed_everything: 0
model:
  class_path: lightning_opt.demo.TinyGPT
  init_args:
    block_size: 16
    n_layer: 1
    n_head: 1
    n_embd: 16
    optimizer: {{name: adamw, lr: 1.0e-2, weight_decay: 0.1, hparams: {{betas: [0.9, 0.95]}}}}
data:
  class_path: lightning_opt.demo.CharDataModule
  init_args: {{block_size: 16, batch_size: 4, max_chars: 20000, train_samples: 64, val_samples: 8}}
trainer:
  accelerator: cpu
  devices: 1
  max_steps: {MAX_STEPS}
  limit_val_batches: 0
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_opt.callbacks.LRSchedule
      init_args: {{shape: cosine, warmup_steps: 4, min_lr_ratio: 0.1}}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{save_last: true, every_n_train_steps: 5}}
    - class_path: tests.test_auto_resume.HangAt
"""


class HangAt(pl.Callback):
    """Stands still at step ``$LIGHTNING_OPT_TEST_HANG_AT`` (when set) so the test can SIGKILL the process there."""

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        step = os.environ.get("LIGHTNING_OPT_TEST_HANG_AT")
        if step is not None and trainer.global_step == int(step):
            Path(os.environ["LIGHTNING_OPT_TEST_MARKER"]).write_text(str(trainer.global_step))
            time.sleep(120)


def _fit(root: Path, *extra: str) -> None:
    args = ["fit", "--config", str(root.parent / "config.yaml"), f"--trainer.default_root_dir={root}"]
    args += [f"--trainer.logger={{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {root}}}}}"]
    assert main([*args, *extra]) == 0


def _last(root: Path) -> dict:
    (path,) = root.glob("lightning_logs/version_0/checkpoints/last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=False)


def _equal(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.fixture
def one_thread():
    # the runs are tiny: on a loaded 2-core machine two OpenMP threads spin far longer than they compute
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkill_then_ckpt_path_last_equals_the_uninterrupted_run(tmp_path: Path, one_thread) -> None:
    (tmp_path / "config.yaml").write_text(CONFIG)
    crashed, straight = tmp_path / "crashed", tmp_path / "straight"
    marker = tmp_path / "hanging"
    env = {**os.environ, "LIGHTNING_OPT_TEST_HANG_AT": str(KILL_AT), "LIGHTNING_OPT_TEST_MARKER": str(marker), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lightning_opt", "fit", "--config", str(tmp_path / "config.yaml")]
    cmd += [f"--trainer.default_root_dir={crashed}"]
    cmd += [f"--trainer.logger={{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {crashed}}}}}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, f"the run ended before step {KILL_AT}:\n{proc.stdout.read().decode()[-3000:]}"
            assert time.monotonic() < deadline, "the run did not reach the kill step in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert _last(crashed)["global_step"] == 10  # the newest checkpoint before the crash

    _fit(crashed, "--ckpt_path=last")  # a new process would log to version_1; it resumes version_0's last.ckpt
    assert (crashed / "lightning_logs" / "version_1").is_dir()
    _fit(straight)

    resumed, reference = _last(crashed), _last(straight)
    assert resumed["global_step"] == reference["global_step"] == MAX_STEPS
    _equal(resumed["state_dict"], reference["state_dict"], "state_dict")
    _equal(resumed["optimizer_states"], reference["optimizer_states"], "optimizer_states")
    _equal(resumed["lr_schedulers"], reference["lr_schedulers"], "lr_schedulers")
    callbacks = {k: v for k, v in resumed["callbacks"].items() if not k.startswith("ModelCheckpoint")}
    _equal(callbacks, {k: v for k, v in reference["callbacks"].items() if not k.startswith("ModelCheckpoint")}, "callbacks")
    assert any(k.startswith("LRSchedule") for k in callbacks)
    _equal(resumed["loops"]["fit_loop"]["epoch_progress"], reference["loops"]["fit_loop"]["epoch_progress"], "loops")
