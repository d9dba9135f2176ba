"""Byte-level text that every machine has: the Python standard library's own source files."""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["CharDataModule", "stdlib_corpus"]


def stdlib_corpus(max_chars: int) -> bytes:
    """The first ``max_chars`` bytes of the stdlib's ``*.py`` files, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks: list[bytes] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_chars:
            break
    corpus = b"".join(chunks)[:max_chars]
    if len(corpus) < 10_000:
        raise RuntimeError(f"found only {len(corpus)} bytes of Python sources under {root}; the demo needs at least 10,000")
    return corpus


class _Windows(Dataset):
    def __init__(self, tokens: torch.Tensor, offsets: torch.Tensor, block_size: int) -> None:
        self.tokens, self.offsets, self.block_size = tokens, offsets, block_size

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        o = int(self.offsets[i])
        chunk = self.tokens[o : o + self.block_size + 1].long()
        return chunk[:-1], chunk[1:]


class _ResumableLoader(DataLoader):
    """A DataLoader that Lightning resumes mid-epoch: it reports the batches it yielded this epoch
    (``state_dict``, saved in every checkpoint) and, once loaded, skips that many at its next iteration.

    Without it a checkpoint taken inside an epoch resumes at the epoch's first batch (Lightning warns
    "your dataloader is not resumable") and the resumed run sees other data than the uninterrupted one.
    The order is fixed (``shuffle=False`` over windows drawn once from the seed), so skipping is exact.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._skip = 0

    def __iter__(self) -> Iterator[Any]:
        # a checkpoint at an epoch's last batch resumes at the next epoch's first: modulo the length
        skip, self._skip = self._skip % max(len(self), 1), 0
        self._yielded = 0
        for batch in super().__iter__():
            self._yielded += 1
            if self._yielded > skip:
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches_yielded": self._yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._skip = int(state_dict["batches_yielded"])


class CharDataModule(L.LightningDataModule):
    """Byte-level language modelling on the stdlib sources, split into train and validation.

    Args:
        block_size: tokens per sample (must match the model's ``block_size``).
        batch_size: samples per batch.
        max_chars: bytes of source text to read.
        val_fraction: the tail fraction of the text held out for validation.
        train_samples: random training windows per epoch (drawn once from ``seed``).
        val_samples: validation windows (evenly spaced over the held-out text).
        seed: seed of the training-window offsets.
    """

    def __init__(
        self,
        block_size: int = 64,
        batch_size: int = 32,
        max_chars: int = 2_000_000,
        val_fraction: float = 0.1,
        train_samples: int = 20_000,
        val_samples: int = 512,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"CharDataModule(val_fraction={val_fraction}) must lie in (0, 1)")
        self.save_hyperparameters()
        self.train_set: _Windows | None = None
        self.val_set: _Windows | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        tokens = torch.frombuffer(bytearray(stdlib_corpus(hp.max_chars)), dtype=torch.uint8)
        split = int(len(tokens) * (1 - hp.val_fraction))
        train, val = tokens[:split], tokens[split:]
        g = torch.Generator().manual_seed(hp.seed)
        self.train_set = _Windows(train, torch.randint(0, len(train) - hp.block_size - 1, (hp.train_samples,), generator=g), hp.block_size)
        n_val = min(hp.val_samples, (len(val) - 1) // hp.block_size)
        val_offsets = torch.linspace(0, len(val) - hp.block_size - 1, n_val).long()
        self.val_set = _Windows(val, val_offsets, hp.block_size)

    def train_dataloader(self) -> DataLoader:
        return _ResumableLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=False, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, shuffle=False, num_workers=self.hparams.num_workers)
