"""Tiny vision models for the recipes: a ResNet and a ViT that train on a CPU in seconds.

The data is synthetic and built in (no download): each class is a fixed random image, and a sample
is its class image plus Gaussian noise, so accuracy climbs within a few hundred steps. The models
are the real architectures at toy width: the ResNet recipe (SGD + warmup + cosine), the ViT recipe
(AdamW, wd 0.3) and the fine-tuning recipe (a 10x lr on ``head`` via ``lr_multipliers``) run on them.

Example:
    lightning-opt fit --config configs/recipes/resnet_sgd_cosine.yaml
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_opt.mixin import OptimizerConfig, OptimizerMixin

__all__ = ["SyntheticImages", "TinyResNet", "TinyViT"]


class SyntheticImages(L.LightningDataModule):
    """Class-template images plus noise, ``(3, image_size, image_size)``, made on the fly.

    Args:
        num_classes: number of classes (default 10).
        image_size: side in pixels (default 16).
        train_samples, val_samples: samples per split (defaults 1024 and 256).
        batch_size: samples per batch (default 64).
        noise: standard deviation of the noise added to the class image (default 1.0).
        seed: seed of the templates and samples (default 0).

    Raises:
        ValueError: a non-positive size or count.
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 16,
        train_samples: int = 1024,
        val_samples: int = 256,
        batch_size: int = 64,
        noise: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_classes", num_classes),
            ("image_size", image_size),
            ("train_samples", train_samples),
            ("val_samples", val_samples),
            ("batch_size", batch_size),
        ):
            if value < 1:
                raise ValueError(f"SyntheticImages({name}={value}) must be >= 1")
        self.save_hyperparameters()
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def _split(self, n: int, templates: torch.Tensor, g: torch.Generator) -> TensorDataset:
        y = torch.randint(0, self.hparams.num_classes, (n,), generator=g)
        x = templates[y] + self.hparams.noise * torch.randn(n, *templates.shape[1:], generator=g)
        return TensorDataset(x, y)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        g = torch.Generator().manual_seed(hp.seed)
        templates = torch.randn(hp.num_classes, 3, hp.image_size, hp.image_size, generator=g)
        self.train_set = self._split(hp.train_samples, templates, g)
        self.val_set = self._split(hp.val_samples, templates, g)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.hparams.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.hparams.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, shuffle=False)


class _Classifier(OptimizerMixin, L.LightningModule):
    """Shared steps: cross-entropy, ``train_loss``, ``val_loss`` and ``val_acc``."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), sync_dist=True)
        return loss


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(_Classifier):
    """A ResNet (basic blocks, BatchNorm, global pooling) at toy width.

    Args:
        num_classes: output classes (default 10).
        width: channels of the first stage; each later stage doubles them (default 16).
        stages: residual stages, one basic block each, the later ones with stride 2 (default 2).
        optimizer: what to train with (default ``OptimizerConfig()``: AdamW).

    Parameter names: ``stem.*``, ``layers.N.*``, ``fc.*`` (the classifier).

    Paper: He et al., "Deep Residual Learning for Image Recognition", arXiv 1512.03385.
    """

    def __init__(
        self, num_classes: int = 10, width: int = 16, stages: int = 2, optimizer: OptimizerConfig | None = None
    ) -> None:
        super().__init__()
        if width < 1 or stages < 1:
            raise ValueError(f"TinyResNet(width={width}, stages={stages}) must both be >= 1")
        self.save_hyperparameters()
        self.optimizer = optimizer if optimizer is not None else OptimizerConfig()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        chans = [width * 2**i for i in range(stages)]
        self.layers = nn.Sequential(
            *(_BasicBlock(chans[max(i - 1, 0)], c, 1 if i == 0 else 2) for i, c in enumerate(chans))
        )
        self.fc = nn.Linear(chans[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))


class TinyViT(_Classifier):
    """A Vision Transformer (patch embedding, class token, pre-norm encoder) at toy width.

    Args:
        num_classes: output classes (default 10).
        image_size: input side in pixels (default 16).
        patch_size: patch side; must divide ``image_size`` (default 4).
        dim, depth, heads: width, encoder layers and attention heads (defaults 64, 2, 4).
        optimizer: what to train with (default ``OptimizerConfig()``: AdamW).

    Parameter names: ``patch_embed.*``, ``cls_token``, ``pos_embed``, ``blocks.N.*``, ``norm.*``,
    ``head.*`` (the classifier, the usual target of a fine-tuning ``lr_multipliers``).

    Paper: Dosovitskiy et al., "An Image is Worth 16x16 Words", arXiv 2010.11929.
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 16,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        optimizer: OptimizerConfig | None = None,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(
                f"TinyViT(image_size={image_size}, patch_size={patch_size}): the patch size must divide the image size"
            )
        if dim % heads:
            raise ValueError(f"TinyViT(dim={dim}, heads={heads}): dim must be divisible by heads")
        self.save_hyperparameters()
        self.optimizer = optimizer if optimizer is not None else OptimizerConfig()
        n_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n_patches + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def no_weight_decay(self) -> set[str]:
        """timm's convention: the class token and position embeddings are not decayed."""
        return {"cls_token", "pos_embed"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])
