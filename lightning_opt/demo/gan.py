"""A tiny GAN for the GAN recipe: two MLPs, manual optimization, two optimizers from the registry.

The data is the classic toy: 2-D points from eight Gaussians on a ring. The generator and the
discriminator each get their own :class:`~lightning_opt.mixin.OptimizerConfig`, built over that
sub-module with :func:`build_gan_optimizers` (which goes through ``lightning_opt.build_optimizer``,
so every registry name, grouping option and hyperparameter check applies).

Example:
    lightning-opt fit --config configs/recipes/gan_adam.yaml
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, TensorDataset

from lightning_opt.mixin import OptimizerConfig, as_optimizer_config

__all__ = ["RingGaussians", "ToyGAN", "build_gan_optimizers"]


def _adam_05() -> OptimizerConfig:
    return OptimizerConfig("adam", lr=2e-4, hparams={"betas": (0.5, 0.999)})


def build_gan_optimizers(
    generator: nn.Module,
    discriminator: nn.Module,
    generator_optimizer: OptimizerConfig | dict[str, Any] | str | None = None,
    discriminator_optimizer: OptimizerConfig | dict[str, Any] | str | None = None,
) -> tuple[Optimizer, Optimizer]:
    """Build the generator's and the discriminator's optimizers, each over its own module.

    Args:
        generator, discriminator: the two networks.
        generator_optimizer, discriminator_optimizer: an ``OptimizerConfig``, a dict of its fields
            or a registry name (default: Adam, lr 2e-4, betas (0.5, 0.999), as DCGAN).

    Example:
        >>> opt_g, opt_d = build_gan_optimizers(gen, disc, "adam", {"name": "adam", "lr": 4e-4})
    """
    g_cfg = _adam_05() if generator_optimizer is None else as_optimizer_config(generator_optimizer)
    d_cfg = _adam_05() if discriminator_optimizer is None else as_optimizer_config(discriminator_optimizer)
    return g_cfg.build(generator), d_cfg.build(discriminator)


class RingGaussians(L.LightningDataModule):
    """2-D samples from ``modes`` Gaussians evenly spaced on a circle.

    Args:
        modes: number of Gaussians (default 8).
        radius: circle radius (default 2.0).
        std: standard deviation of each Gaussian (default 0.05).
        samples: training samples (default 2048).
        batch_size: samples per batch (default 128).
        seed: sampling seed (default 0).
    """

    def __init__(
        self,
        modes: int = 8,
        radius: float = 2.0,
        std: float = 0.05,
        samples: int = 2048,
        batch_size: int = 128,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if modes < 1 or samples < 1 or batch_size < 1:
            raise ValueError(
                f"RingGaussians(modes={modes}, samples={samples}, batch_size={batch_size}) must all be >= 1"
            )
        self.save_hyperparameters()
        self.train_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        g = torch.Generator().manual_seed(hp.seed)
        k = torch.randint(0, hp.modes, (hp.samples,), generator=g).double() * (2 * math.pi / hp.modes)
        centers = hp.radius * torch.stack([k.cos(), k.sin()], dim=1)
        self.train_set = TensorDataset(
            (centers + hp.std * torch.randn(hp.samples, 2, generator=g, dtype=torch.float64)).float()
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.hparams.batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(self.hparams.seed),
        )


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.LeakyReLU(0.2),
        nn.Linear(hidden, hidden),
        nn.LeakyReLU(0.2),
        nn.Linear(hidden, d_out),
    )


class ToyGAN(L.LightningModule):
    """A non-saturating GAN on 2-D points with manual optimization and two optimizers.

    Each batch: one discriminator step on real vs generated points, then one generator step.
    Logs ``d_loss`` and ``g_loss``. Works with ``LRSchedule`` (each optimizer advances on its own
    steps), though the GAN recipe uses none.

    Args:
        latent_dim: noise dimension (default 8).
        hidden: width of both MLPs (default 64).
        generator_optimizer, discriminator_optimizer: see :func:`build_gan_optimizers`.

    Paper: Goodfellow et al., "Generative Adversarial Networks", arXiv 1406.2661; Adam with
    beta1 = 0.5 from Radford et al. (DCGAN), arXiv 1511.06434.
    """

    def __init__(
        self,
        latent_dim: int = 8,
        hidden: int = 64,
        generator_optimizer: OptimizerConfig | None = None,
        discriminator_optimizer: OptimizerConfig | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.latent_dim = latent_dim
        self.generator_optimizer = generator_optimizer if generator_optimizer is not None else _adam_05()
        self.discriminator_optimizer = discriminator_optimizer if discriminator_optimizer is not None else _adam_05()
        self.generator = _mlp(latent_dim, hidden, 2)
        self.discriminator = _mlp(2, hidden, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> None:
        (real,) = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(len(real), self.latent_dim, device=real.device)
        fake = self.generator(z)
        ones, zeros = torch.ones(len(real), 1, device=real.device), torch.zeros(len(real), 1, device=real.device)

        d_loss = F.binary_cross_entropy_with_logits(
            self.discriminator(real), ones
        ) + F.binary_cross_entropy_with_logits(self.discriminator(fake.detach()), zeros)
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()

        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(fake), ones)  # non-saturating
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.log_dict({"d_loss": d_loss, "g_loss": g_loss}, prog_bar=True)

    def configure_optimizers(self) -> list[Optimizer]:
        return list(
            build_gan_optimizers(
                self.generator, self.discriminator, self.generator_optimizer, self.discriminator_optimizer
            )
        )

    def configure_callbacks(self) -> list[Any]:
        from lightning_opt.optim.registry import get_optimizer_info, make_callbacks

        present = tuple(type(cb) for cb in (self._trainer.callbacks if self._trainer is not None else []))
        needed, seen = [], set()
        for cfg in (self.generator_optimizer, self.discriminator_optimizer):
            for cb in make_callbacks(get_optimizer_info(as_optimizer_config(cfg).name)):
                if not isinstance(cb, present) and type(cb) not in seen:
                    seen.add(type(cb))
                    needed.append(cb)
        return needed
