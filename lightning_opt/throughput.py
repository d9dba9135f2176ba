"""What Lightning's ``ThroughputMonitor`` needs to log tokens/s and MFU: FLOPs per batch and batch sizes.

Lightning's :class:`lightning.pytorch.callbacks.ThroughputMonitor` logs ``train/device/samples_per_sec``,
``train/device/items_per_sec`` (tokens/s with ``length_fn``), ``train/device/flops_per_sec`` and
``train/device/mfu`` (model FLOPs utilization: achieved FLOPs / the device's peak, from
``lightning.fabric.utilities.throughput.get_available_flops``). It reads the FLOPs of one batch from
the module's ``flops_per_batch`` attribute; :class:`~lightning_opt.demo.TinyGPT` computes it with
:func:`gpt_flops`. Where the peak is unknown (CPU, an unlisted GPU) MFU is simply not logged.

Wiring it in YAML (the GPT recipes do)::

    trainer:
      callbacks:
        - class_path: lightning.pytorch.callbacks.ThroughputMonitor
          init_args:
            batch_size_fn: lightning_opt.throughput.batch_size
            length_fn: lightning_opt.throughput.batch_tokens

For your own transformer, set ``flops_per_batch`` (an attribute or property) on the LightningModule,
e.g. ``gpt_flops(n_layer=..., n_embd=..., vocab_size=..., seq_len=t, batch_size=b)``; for any other
model measure it once with ``lightning.fabric.utilities.throughput.measure_flops``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

__all__ = ["batch_size", "batch_tokens", "gpt_flops", "gpt_matmul_params"]


def gpt_matmul_params(*, n_layer: int, n_embd: int, vocab_size: int) -> int:
    """``N = 12 n_layer d^2 + d V``: the weights a GPT-2 block stack and its LM head multiply by.

    Per block: the QKV projection ``3 d^2``, the attention output ``d^2`` and the MLP ``8 d^2``; plus
    the untied LM head ``d V``. Embedding lookups, biases and norms are not matmuls and are left
    out (their FLOPs are O(d) per token, as in Kaplan et al. 2020 and PaLM's MFU).
    """
    return 12 * n_layer * n_embd**2 + n_embd * vocab_size


def gpt_flops(
    *, n_layer: int, n_embd: int, vocab_size: int, seq_len: int, batch_size: int = 1, backward: bool = True
) -> int:
    """Matmul FLOPs of a GPT-2-shaped transformer on ``batch_size`` sequences of ``seq_len`` tokens.

    Per token, forward: ``2 N`` for the weight matmuls (:func:`gpt_matmul_params`) plus
    ``4 n_layer seq_len d`` for attention (``Q K^T`` and ``A V``: ``2 seq_len d`` each, over the full
    ``seq_len x seq_len`` matrix, as PaLM's MFU counts it, not the causal half a flash kernel
    skips). The backward pass costs twice the forward (two matmuls per forward matmul), so a
    training step is ``6 N + 12 n_layer seq_len d`` per token (PaLM, Chowdhery et al. 2022, app. B).

    Args:
        n_layer, n_embd, vocab_size: the model's depth, width and vocabulary.
        seq_len: tokens per sequence. batch_size: sequences.
        backward: ``True`` (default) counts forward + backward (training), ``False`` the forward only.

    Returns:
        FLOPs (multiply-adds count as 2) as an int.
    """
    n = gpt_matmul_params(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size)
    forward_per_token = 2 * n + 4 * n_layer * seq_len * n_embd
    return (3 if backward else 1) * forward_per_token * seq_len * batch_size


def _inputs(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        for key in ("input_ids", "inputs", "x"):
            if key in batch:
                return batch[key]
    elif isinstance(batch, Sequence) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(
        "lightning_opt.throughput: expected a batch that is a tensor, a (inputs, targets) tuple or a dict with "
        f"'input_ids', got {type(batch).__name__}; pass your own batch_size_fn/length_fn to ThroughputMonitor"
    )


def batch_size(batch: Any) -> int:
    """Samples in a token batch: the first dimension of its inputs (``ThroughputMonitor(batch_size_fn=...)``)."""
    return int(_inputs(batch).shape[0])


def batch_tokens(batch: Any) -> int:
    """Tokens in a token batch: the number of input elements, ``batch x seq`` (``ThroughputMonitor(length_fn=...)``)."""
    return int(_inputs(batch).numel())
