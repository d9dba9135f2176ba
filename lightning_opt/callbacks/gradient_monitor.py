"""``GradientMonitor``: gradient, parameter and update norms per layer, every N optimizer steps."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_opt.optim.precision import all_reduce_coalesced, is_dtensor

__all__ = ["GradientMonitor", "global_grad_norm", "layer_of", "reduce_local_sums"]


def _local(t: Tensor) -> tuple[Tensor, Any]:
    """The tensor this rank holds, and the key of its sharding (``None`` for a plain tensor).

    A DTensor with a ``Partial`` placement holds an unreduced addend, whose squared norm means
    nothing; it is redistributed to ``Replicate`` first (FSDP2 gradients are ``Shard``, never
    ``Partial``, so the common path has no extra collective).
    """
    if not is_dtensor(t):
        return t, None
    if any(p.is_partial() for p in t.placements):
        from torch.distributed.tensor import Replicate

        t = t.redistribute(t.device_mesh, [Replicate() if p.is_partial() else p for p in t.placements])
    return t.to_local(), (t.device_mesh, tuple(t.placements))


def reduce_local_sums(sums: Tensor, specs: Sequence[Any]) -> Tensor:
    """Turn per-tensor sums over local shards (rows of ``sums``) into sums over the whole tensors.

    Rows whose spec is ``None`` (plain tensors, e.g. DDP replicas whose gradients are already
    all-reduced) are left alone. Rows of DTensors are all-reduced over every mesh dimension on which
    the tensor is sharded, coalesced (:func:`~lightning_opt.optim.precision.all_reduce_coalesced`): one
    collective per process group, in the order the groups first appear, which is the same on every rank.

    Args:
        sums: ``[n, k]`` float tensor; row ``i`` holds additive statistics (squared norms, counts)
            of tensor ``i``'s local shard.
        specs: ``n`` sharding keys from ``_local`` (``None`` or ``(mesh, placements)``).

    Returns:
        A new ``[n, k]`` tensor of global sums.
    """
    out = sums.clone()
    groups: dict[Any, list[int]] = {}
    for i, spec in enumerate(specs):
        if spec is not None:
            groups.setdefault(spec, []).append(i)
    parts, picked = [], []
    for (mesh, placements), rows in groups.items():
        dims = [d for d, p in enumerate(placements) if p.is_shard()]
        if not dims:
            continue
        index = torch.tensor(rows, device=out.device)
        part = out.index_select(0, index)
        parts += [(mesh.get_group(d), part) for d in dims]  # one group after the other: sums commute
        picked.append((index, part))
    all_reduce_coalesced(parts)
    for index, part in picked:
        out.index_copy_(0, index, part)
    return out


def global_grad_norm(params: Iterable[Tensor]) -> Tensor:
    """The L2 norm of all gradients together, in float32, as a tensor (no host sync).

    Plain tensors (single process, DDP after its all-reduce) are reduced locally; DTensor shards
    (FSDP2, tensor parallel) contribute the squared norm of their local shard, all-reduced over the
    sharded mesh dimensions, so the result equals the single-process norm on every rank.
    Non-finite gradients give a non-finite norm.
    """
    locals_, specs = [], []
    for p in params:
        if p.grad is None:
            continue
        g, spec = _local(p.grad)
        locals_.append(g)
        specs.append(spec)
    if not locals_:
        return torch.zeros(())
    norms = torch._foreach_norm(locals_, 2, dtype=torch.float32)
    device = norms[0].device
    sq = torch.stack([n.to(device) for n in norms]).square()
    if any(s is not None for s in specs):
        sq = reduce_local_sums(sq.unsqueeze(1), specs).squeeze(1)
    return sq.sum().sqrt()


def layer_of(name: str, depth: int | None) -> str:
    """The layer a parameter belongs to: the first ``depth`` parts of its module path.

    ``layer_of("transformer.h.0.attn.c_attn.weight", 3) == "transformer.h.0"``; the result never
    goes below the owning module (``layer_of("lm_head.weight", 3) == "lm_head"``), and ``depth=None``
    means the owning module itself. A parameter registered on the root module is its own layer.
    """
    parts = name.split(".")
    module = parts[:-1] or parts
    return ".".join(module if depth is None else module[:depth])


class GradientMonitor(Callback):
    """Log gradient norms, parameter norms and update-to-parameter ratios per layer every N steps.

    On a logging step (``(trainer.global_step + 1) % log_every_n_steps == 0``, the convention of
    ``Trainer(log_every_n_steps=...)``, so the first record is after N steps), in
    ``on_before_optimizer_step`` (after AMP unscaling, before gradient clipping) it measures

    - ``grad_norm/total``: the L2 norm of all gradients; ``grad_norm/<layer>`` per layer;
    - ``param_norm/total`` and ``param_norm/<layer>``: the parameters before the step;
    - ``grad/nonfinite``: the count of NaN/Inf gradient elements (the first parameter that has one
      is named in a warning and kept in :attr:`first_nonfinite`);
    - ``grad/missing``: the count of trainable parameters whose ``.grad`` is ``None`` (a broken
      gradient flow; their names are in a warning and in :attr:`missing_grads`);

    and, once the step is taken (``on_train_batch_end``), ``update_ratio/<layer>`` =
    ``||p_after - p_before|| / ||p_before||`` (0 for a step the GradScaler or a ``SpikeGuard``
    skipped). ``p_before`` is a copy of the parameters made only on logging steps.

    The values go straight to ``trainer.loggers`` (as ``LearningRateMonitor`` does), so they are
    not lost when the Trainer's own ``log_every_n_steps`` differs, and are kept in :attr:`metrics`.
    Non-logging steps do no work at all: no kernel, no host synchronisation. A logging step costs
    one pass over gradients and parameters, a copy of the parameters and one host sync.

    Distributed: under DDP the gradients are already all-reduced, so every rank measures the same
    values locally. Under FSDP2 / tensor parallelism, parameters and gradients are DTensor shards:
    squared norms and counts of the local shards are all-reduced over the sharded mesh dimensions
    (one small collective per sharding layout), never gathered with ``full_tensor()``. Every rank
    must therefore run the callback, which Lightning does.

    Args:
        log_every_n_steps: measure every this many optimizer steps (default 50).
        depth: how many leading parts of a parameter's module path name its layer
            (default 3: ``transformer.h.0``, ``model.layers.11``); ``None`` groups by owning module.
        log_update_ratio: measure ``update_ratio/<layer>``; costs one copy of the parameters on
            logging steps (default ``True``).

    Raises:
        ValueError: ``log_every_n_steps < 1`` or ``depth < 1``.

    Example:
        >>> trainer = L.Trainer(callbacks=[GradientMonitor(log_every_n_steps=50, depth=3)])
    """

    def __init__(self, *, log_every_n_steps: int = 50, depth: int | None = 3, log_update_ratio: bool = True) -> None:
        super().__init__()
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(
                f"GradientMonitor(log_every_n_steps={log_every_n_steps!r}) is invalid; it must be an integer >= 1"
            )
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
            raise ValueError(
                f"GradientMonitor(depth={depth!r}) is invalid; it must be an integer >= 1, or None for the owning module"
            )
        self.log_every_n_steps = log_every_n_steps
        self.depth = depth
        self.log_update_ratio = bool(log_update_ratio)
        self.metrics: dict[str, float] = {}
        self.first_nonfinite: str | None = None
        self.missing_grads: list[str] = []
        self._pending: dict[str, Any] | None = None
        self._warned_missing: set[tuple[str, ...]] = set()

    def _is_logging_step(self, trainer: pl.Trainer) -> bool:
        return (trainer.global_step + 1) % self.log_every_n_steps == 0

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if not self._is_logging_step(trainer):
            return
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        if not named:
            return
        self._pending = self._measure_before(named)

    def _measure_before(self, named: list[tuple[str, Tensor]]) -> dict[str, Any]:
        names = [n for n, _ in named]
        params = [p for _, p in named]
        p_local, specs = zip(*(_local(p.detach()) for p in params))
        rows = []
        for p, pl_ in zip(params, p_local):
            p_sq = torch.linalg.vector_norm(pl_, dtype=torch.float32).square()
            if p.grad is None:
                rows.append(torch.stack([p_sq.new_zeros(()), p_sq.new_zeros(()), p_sq]))
                continue
            g, _ = _local(p.grad)
            g_sq = torch.linalg.vector_norm(g, dtype=torch.float32).square()
            bad = torch.isfinite(g).logical_not().sum().to(torch.float32)
            rows.append(torch.stack([g_sq, bad, p_sq.to(g_sq.device)]))
        device = rows[0].device
        stats = reduce_local_sums(torch.stack([r.to(device) for r in rows]), specs)
        before = [t.clone() for t in p_local] if self.log_update_ratio else None
        has_grad = [p.grad is not None for p in params]
        return {
            "names": names,
            "params": params,
            "specs": specs,
            "stats": stats,
            "before": before,
            "has_grad": has_grad,
        }

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        update_sq = None
        if pending["before"] is not None:
            after = [_local(p.detach())[0] for p in pending["params"]]
            diffs = torch._foreach_sub(after, pending["before"])
            norms = torch._foreach_norm(diffs, 2, dtype=torch.float32)
            sq = torch.stack([n.to(pending["stats"].device) for n in norms]).square()
            update_sq = reduce_local_sums(sq.unsqueeze(1), pending["specs"]).squeeze(1)
        self.metrics = self._summarise(pending, update_sq)
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(self.metrics, step=step)

    def _summarise(self, pending: dict[str, Any], update_sq: Tensor | None) -> dict[str, float]:
        names: list[str] = pending["names"]
        layers = [layer_of(n, self.depth) for n in names]
        order = list(dict.fromkeys(layers))
        index = torch.tensor([order.index(layer) for layer in layers], device=pending["stats"].device)
        cols = [pending["stats"]] if update_sq is None else [pending["stats"], update_sq.unsqueeze(1)]
        per_param = torch.cat(cols, dim=1)
        per_layer = torch.zeros(len(order), per_param.shape[1], device=per_param.device).index_add_(0, index, per_param)
        # the one host sync of a logging step
        layer_vals = per_layer.tolist()
        bad_per_param = per_param[:, 1].tolist()
        total = per_param.sum(0).tolist()

        metrics: dict[str, float] = {
            "grad_norm/total": total[0] ** 0.5,
            "param_norm/total": total[2] ** 0.5,
            "grad/nonfinite": total[1],
        }
        for layer, vals in zip(order, layer_vals):
            metrics[f"grad_norm/{layer}"] = vals[0] ** 0.5
            metrics[f"param_norm/{layer}"] = vals[2] ** 0.5
            if update_sq is not None:
                metrics[f"update_ratio/{layer}"] = vals[3] ** 0.5 / max(vals[2] ** 0.5, 1e-12)

        self.first_nonfinite = next((n for n, b in zip(names, bad_per_param) if b > 0), None)
        if self.first_nonfinite is not None:
            rank_zero_warn(
                f"GradientMonitor: {int(total[1])} non-finite gradient elements; the first parameter with one is {self.first_nonfinite!r}"
            )
        self.missing_grads = [n for n, has in zip(names, pending["has_grad"]) if not has]
        metrics["grad/missing"] = float(len(self.missing_grads))
        key = tuple(self.missing_grads)
        if key and key not in self._warned_missing:
            self._warned_missing.add(key)
            rank_zero_warn(
                f"GradientMonitor: trainable parameters received no gradient: {', '.join(self.missing_grads)}"
            )
        return metrics
