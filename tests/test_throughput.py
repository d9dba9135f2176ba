"""FLOPs of the demo GPT against torch's FlopCounterMode; Lightning's ThroughputMonitor on the demo and the recipes."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.loggers import Logger
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lightning_opt.demo import TinyGPT
from lightning_opt.throughput import batch_size, batch_tokens, gpt_flops

ROOT = Path(__file__).resolve().parents[1]
GPT_RECIPES = [ROOT / "configs" / "recipes" / f"{n}.yaml" for n in ("bert_pretraining", "llm_pretraining_wsd", "muon_llm")]


@pytest.mark.parametrize(
    "cfg", [dict(n_layer=2, n_head=2, n_embd=32, vocab_size=256, t=16, b=3), dict(n_layer=3, n_head=4, n_embd=24, vocab_size=50, t=7, b=2)]
)
def test_gpt_flops_equal_torch_flop_counter(cfg: dict) -> None:
    t, b = cfg.pop("t"), cfg.pop("b")
    model = TinyGPT(block_size=16, **cfg)
    x = torch.randint(0, cfg["vocab_size"], (b, t))
    # the math backend runs attention as two bmm's that FlopCounterMode counts (it does not count
    # the CPU flash kernel), i.e. the full t x t attention matrix that gpt_flops counts
    counted = {}
    for backward in (False, True):
        counter = FlopCounterMode(display=False)
        with sdpa_kernel(SDPBackend.MATH), counter:
            loss = model.loss((x, x))
            if backward:
                loss.backward()
        counted[backward] = counter.get_total_flops()
        kw = {k: cfg[k] for k in ("n_layer", "n_embd", "vocab_size")}
        assert gpt_flops(**kw, seq_len=t, batch_size=b, backward=backward) == counted[backward]
    assert counted[True] == 3 * counted[False]  # backward = 2 x forward
    # the module's own attribute: the last batch, forward + backward in train mode, forward in eval
    assert model.flops_per_batch == counted[True]
    model.eval()
    assert model.flops_per_batch == counted[False]


def test_batch_fns() -> None:
    x = torch.zeros(4, 9, dtype=torch.long)
    for batch in ((x, x), [x, x], x, {"input_ids": x}):
        assert (batch_size(batch), batch_tokens(batch)) == (4, 36)
    with pytest.raises(TypeError, match="batch_size_fn/length_fn"):
        batch_size("text")


class _Memory(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[dict[str, float]] = []

    name = "memory"
    version = 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append(dict(metrics))


def _fit(monkeypatch: pytest.MonkeyPatch, peak: float | None) -> tuple[list[dict], int]:
    import lightning.pytorch.callbacks.throughput_monitor as tm

    if peak is not None:  # a device whose peak Lightning knows (get_available_flops returns None on CPU)
        monkeypatch.setattr(tm, "get_available_flops", lambda device, dtype: int(peak))
    torch.manual_seed(0)
    model = TinyGPT(block_size=8, n_layer=1, n_head=1, n_embd=16)
    x = torch.randint(0, 256, (24, 8))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x), batch_size=4)
    logger = _Memory()
    trainer = pl.Trainer(
        max_steps=6, accelerator="cpu", logger=logger, log_every_n_steps=1, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ThroughputMonitor(batch_size_fn=batch_size, length_fn=batch_tokens, window_size=3)],
    )
    trainer.fit(model, data)
    return logger.metrics, gpt_flops(n_layer=1, n_embd=16, vocab_size=256, seq_len=8, batch_size=4)


def test_throughput_monitor_logs_tokens_per_second_and_no_mfu_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics, _ = _fit(monkeypatch, None)
    last = [m for m in metrics if "train/device/items_per_sec" in m][-1]
    assert last["train/samples"] == 24 and last["train/lengths"] == 24 * 8
    assert last["train/device/items_per_sec"] == pytest.approx(8 * last["train/device/samples_per_sec"])
    assert last["train/device/flops_per_sec"] > 0
    assert not any("mfu" in k for m in metrics for k in m)


def test_throughput_monitor_logs_mfu_when_the_peak_is_known(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics, flops = _fit(monkeypatch, 1e12)
    last = [m for m in metrics if "train/device/mfu" in m][-1]
    assert last["train/device/mfu"] == pytest.approx(last["train/device/flops_per_sec"] / 1e12)
    # flops/s over the window equals our FLOPs per batch times batches/s
    assert last["train/device/flops_per_sec"] == pytest.approx(flops * last["train/device/batches_per_sec"], rel=1e-6)


@pytest.mark.parametrize("path", GPT_RECIPES, ids=lambda p: p.name)
def test_gpt_recipes_wire_the_throughput_monitor(path: Path, tmp_path: Path) -> None:
    from lightning_opt.cli import _cli

    cli = _cli(["--config", str(path), f"--trainer.default_root_dir={tmp_path}"], run=False, save_config=False)
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, ThroughputMonitor)]
    assert (monitor.batch_size_fn, monitor.length_fn) == (batch_size, batch_tokens)
