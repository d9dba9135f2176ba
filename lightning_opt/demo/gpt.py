"""A tiny character-level (byte-level) GPT, GPT-2 parameter names, for the demo and the tests."""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lightning_opt.losses import z_loss
from lightning_opt.mixin import OptimizerConfig, OptimizerMixin
from lightning_opt.optim.base import is_number
from lightning_opt.throughput import gpt_flops

__all__ = ["TinyGPT"]


class _SelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class _Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = _SelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(n_embd, 4 * n_embd))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(OptimizerMixin, L.LightningModule):
    """A GPT-2-shaped language model over bytes, small enough to train on a CPU in a minute.

    Args:
        vocab_size: 256 for byte-level text.
        block_size: context length in tokens.
        n_layer, n_head, n_embd: depth, heads and width.
        optimizer: what to train with (see :class:`~lightning_opt.mixin.OptimizerConfig`).
        z_loss_weight: weight of PaLM's output z-loss (:func:`lightning_opt.losses.z_loss`) added to
            the training loss; ``0`` (default) turns it off. Must be finite and >= 0.

    Logs ``train_loss`` (the cross-entropy) every step, ``train/z_loss`` when the z-loss is on (the
    training objective is their sum), and ``val_loss`` per validation run (nats per byte).

    ``flops_per_batch`` (read by Lightning's ``ThroughputMonitor`` for FLOPs/s and MFU) is the matmul
    FLOPs of the last batch seen: forward + backward in training, forward only in evaluation
    (:func:`lightning_opt.throughput.gpt_flops`).
    """

    def __init__(
        self,
        vocab_size: int = 256,
        block_size: int = 64,
        n_layer: int = 2,
        n_head: int = 2,
        n_embd: int = 64,
        optimizer: OptimizerConfig | None = None,
        z_loss_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"TinyGPT(n_embd={n_embd}, n_head={n_head}): n_embd must be divisible by n_head")
        if not (is_number(z_loss_weight) and z_loss_weight >= 0):
            raise ValueError(f"TinyGPT(z_loss_weight={z_loss_weight!r}) is invalid; it must be a finite number >= 0 (0 = off)")
        self.z_loss_weight = float(z_loss_weight)
        self._batch_shape: tuple[int, int] | None = None  # (batch, seq) of the last batch, for flops_per_batch
        self.save_hyperparameters()
        self.optimizer = optimizer if optimizer is not None else OptimizerConfig()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab_size, n_embd),
                "wpe": nn.Embedding(block_size, n_embd),
                "h": nn.ModuleList(_Block(n_embd, n_head) for _ in range(n_layer)),
                "ln_f": nn.LayerNorm(n_embd),
            }
        )
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy``: FSDP2, each block sharded on its own, then the rest.

        ``fully_shard`` over the strategy's data-parallel mesh (``self.device_mesh``); other
        strategies set no mesh and nothing happens. Runs once (a model already sharded is left as is).
        """
        mesh = self.device_mesh
        if mesh is None or any(hasattr(p, "device_mesh") for p in self.parameters()):
            return
        from torch.distributed.fsdp import fully_shard

        dp = mesh["data_parallel"]
        for block in self.transformer["h"]:
            fully_shard(block, mesh=dp)
        # the root: the embeddings, final norm and head (a ModuleDict has no forward to hook)
        fully_shard(self, mesh=dp)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than block_size={self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.transformer["wte"](idx) + self.transformer["wpe"](pos)
        for block in self.transformer["h"]:
            x = block(x)
        return self.lm_head(self.transformer["ln_f"](x))

    @property
    def flops_per_batch(self) -> int | None:
        """Matmul FLOPs of the last batch (forward + backward in train mode, forward in eval); ``None`` before any."""
        if self._batch_shape is None:
            return None
        hp = self.hparams
        b, t = self._batch_shape
        return gpt_flops(
            n_layer=hp.n_layer, n_embd=hp.n_embd, vocab_size=hp.vocab_size, seq_len=t, batch_size=b, backward=self.training
        )

    def _cross_entropy(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        self._batch_shape = (int(x.shape[0]), int(x.shape[1]))
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)), logits

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The cross-entropy (nats per byte), without the z-loss."""
        return self._cross_entropy(batch)[0]

    def training_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(cross-entropy, z-loss)``; the objective is their sum; the z-loss is ``None`` when off."""
        ce, logits = self._cross_entropy(batch)
        return ce, (z_loss(logits, self.z_loss_weight) if self.z_loss_weight > 0 else None)

    def sophia_logits(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Logits for SophiaG's Gauss-Newton-Bartlett estimator (``SophiaHessian`` samples labels from them)."""
        return self(batch[0])

    def sophia_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The loss for SophiaH's Hutchinson estimator (``SophiaHessian`` differentiates it twice): the training objective."""
        ce, z = self.training_loss(batch)
        return ce if z is None else ce + z

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ce, z = self.training_loss(batch)
        self.log("train_loss", ce, prog_bar=True)
        if z is None:
            return ce
        self.log("train/z_loss", z)
        return ce + z

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        return loss
