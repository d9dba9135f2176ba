"""z-loss against its formula in float64, in float32/bf16 and at large logits; the demo GPT's z_loss_weight."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_opt.demo import TinyGPT
from lightning_opt.losses import z_loss


def _formula(logits: torch.Tensor, weight: float) -> torch.Tensor:
    """weight * mean(log(sum(exp(x)))^2) in float64, written out (max-shifted, no torch.logsumexp)."""
    x = logits.detach().double()
    m = x.max(dim=-1, keepdim=True).values
    lse = m.squeeze(-1) + (x - m).exp().sum(-1).log()
    return weight * (lse * lse).mean()


@pytest.mark.parametrize("shape", [(3, 5, 7), (16, 8)])  # LM logits (batch, seq, vocab); router (tokens, experts)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 3e3])  # 3e3: exp() overflows float32 and bf16 unless shifted
def test_matches_formula_in_float64(shape: tuple, dtype: torch.dtype, scale: float) -> None:
    if dtype is torch.float16 and scale > 1:
        scale = 300.0  # float16 tops out at 65504
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    got = z_loss(logits, weight=1e-3)
    assert got.dtype == (torch.float64 if dtype is torch.float64 else torch.float32)
    assert got.shape == ()
    expected = _formula(logits, 1e-3)  # on the same (rounded) input values
    rtol = 1e-12 if dtype is torch.float64 else 2e-6
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=0)


def test_bf16_logsumexp_without_upcast_is_what_this_avoids() -> None:
    logits = (torch.randn(64, 50, generator=torch.Generator().manual_seed(1)) * 3).bfloat16()
    expected = _formula(logits, 1.0)
    naive = (torch.logsumexp(logits, -1) ** 2).mean().double()  # bf16 throughout: ~3 significant digits
    assert abs(float(naive / expected) - 1) > 1e-4
    assert abs(float(z_loss(logits, 1.0).double() / expected) - 1) < 2e-6


def test_gradient() -> None:
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: z_loss(t, 0.3), (x,))
    # d/dx = 2 w lse softmax(x) / rows, for bf16 input too (the gradient comes back in bf16)
    xb = (torch.randn(8, 32, generator=torch.Generator().manual_seed(2)) * 20).bfloat16().requires_grad_()
    z_loss(xb, 0.5).backward()
    x64 = xb.detach().double()
    expected = 2 * 0.5 * torch.logsumexp(x64, -1, keepdim=True) * x64.softmax(-1) / 8
    assert xb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(xb.grad.double(), expected, rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("weight", [-1e-4, math.inf, math.nan, True, "1e-4"])
def test_rejects_bad_weight(weight) -> None:
    with pytest.raises(ValueError, match=r"z_loss\(weight="):
        z_loss(torch.zeros(2, 3), weight)


@pytest.mark.parametrize("logits", [torch.zeros(2, 3, dtype=torch.long), torch.zeros(4, 0), torch.tensor(1.0)])
def test_rejects_bad_logits(logits) -> None:
    with pytest.raises(ValueError, match=r"z_loss\(logits\)"):
        z_loss(logits)


def test_zero_weight_is_zero() -> None:
    assert z_loss(torch.randn(3, 4) * 100, 0.0).item() == 0.0


def _tiny(**kw) -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(block_size=8, n_layer=1, n_head=1, n_embd=16, **kw)


@pytest.mark.parametrize("weight", [-0.1, math.nan, "0.1"])
def test_demo_gpt_validates_z_loss_weight(weight) -> None:
    with pytest.raises(ValueError, match=r"TinyGPT\(z_loss_weight="):
        _tiny(z_loss_weight=weight)


def test_demo_gpt_adds_and_logs_the_z_loss() -> None:
    import lightning.pytorch as pl

    batch = (torch.randint(0, 256, (4, 8)), torch.randint(0, 256, (4, 8)))
    model, plain = _tiny(z_loss_weight=0.05), _tiny()
    ce = plain.loss(batch)
    logits = plain(batch[0])
    objective = model.training_step(batch, 0)  # no trainer: self.log only warns
    torch.testing.assert_close(objective, ce + z_loss(logits, 0.05))
    assert model.loss(batch).item() == ce.item()  # validation loss: cross-entropy only

    seen = {}

    class Grab(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            seen.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*batch), batch_size=4)
    for m, logged in ((model, True), (plain, False)):
        seen.clear()
        trainer = pl.Trainer(
            max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[Grab()],
        )
        trainer.fit(m, data)
        assert ("train/z_loss" in seen) is logged
    torch.testing.assert_close(seen["train_loss"], ce.item())
