"""``SophiaHessian``: refresh Sophia's diagonal-Hessian estimate every k steps in automatic optimization."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.optim import Optimizer

from lightning_opt.optim.precision import is_dtensor
from lightning_opt.optim.sophia import gnb_estimate, hutchinson_estimate


def _any_dtensor(params: list[Tensor]) -> bool:
    return any(is_dtensor(p) for p in params)


def _refuse_hutchinson_on_shards(params: list[Tensor]) -> None:
    if _any_dtensor(params):
        raise RuntimeError(
            "SophiaHessian: sophia_h's Hutchinson estimate needs Hessian-vector products "
            "(torch.autograd.grad with create_graph), but on FSDP2-sharded parameters autograd "
            "returns no gradient (the graph holds FSDP2's gathered copies); use sophia (SophiaG, "
            "whose estimate goes through the regular backward) under FSDP2, or DDP for sophia_h"
        )


def _grads_through_backward(loss: Tensor, params: list[Tensor], live: list[int]) -> list[Tensor | None]:
    """``d loss / d params[live]`` of FSDP2-sharded parameters, through ``backward``.

    ``torch.autograd.grad`` gives ``None`` for FSDP2 shards (the graph holds the gathered copies);
    ``backward`` reaches them through FSDP2's reduce-scatter, which also averages over the ranks (as
    the DDP path's all-reduce does). The training gradients are set aside and put back.
    """
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        loss.backward()
        grads = [params[i].grad for i in live]
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return grads


__all__ = ["SophiaHessian", "sophia_optimizer"]

Distribution = Literal["gaussian", "rademacher"]


def sophia_optimizer(optimizer: Any) -> Optimizer | None:
    """``optimizer`` (or the optimizer a wrapper holds) if it is a Sophia optimizer, else ``None``."""
    seen = 0
    while optimizer is not None and seen < 4:
        if getattr(optimizer, "hessian_estimator", "") in ("gnb", "hutchinson") and callable(
            getattr(optimizer, "update_hessian", None)
        ):
            return optimizer
        optimizer = next(
            (getattr(optimizer, a) for a in ("_optimizer", "base_optimizer", "optimizer") if hasattr(optimizer, a)),
            None,
        )
        seen += 1
    return None


class SophiaHessian(Callback):
    """Refresh the Hessian EMA of ``sophia``/``sophia_h`` every ``every_n_steps`` optimizer steps.

    Runs inside Lightning's automatic optimization (no ``automatic_optimization = False`` needed):
    on optimizer steps ``1, k + 1, 2k + 1, ...`` (the paper's ``t mod k = 1``), after the training
    backward (``on_before_optimizer_step``), it evaluates the current batch again and computes a
    fresh estimate. The estimate is folded into the optimizer's ``h`` (``optimizer.update_hessian``)
    by an optimizer step pre-hook, which torch runs only when the optimizer's real ``step`` runs,
    just before the update: a step that is not taken (a ``SpikeGuard`` skip, a GradScaler inf-skip)
    leaves the optimizer state bit-identical and its estimate is dropped. Gradients are taken with
    ``torch.autograd.grad``, so ``p.grad`` (the training gradient) is not touched.

    - SophiaG (Gauss-Newton-Bartlett): labels are sampled from ``softmax(logits)`` and the estimate
      is the squared gradient of the mean cross-entropy against them. The model provides logits:
      implement ``sophia_logits(self, batch) -> Tensor`` on the LightningModule, or pass
      ``logits_fn(pl_module, batch)``. Logits have shape ``(..., num_classes)``; return only the
      positions that count (drop padding). Set the optimizer's ``bs`` to the number of those
      positions per optimizer step.
    - SophiaH (Hutchinson): the estimate is ``u * (H u)`` from a Hessian-vector product of the loss.
      Implement ``sophia_loss(self, batch) -> Tensor`` (a scalar) or pass ``loss_fn(pl_module, batch)``.
      That forward runs under ``sdpa_kernel(SDPBackend.MATH)``: the fused attention kernels have no
      double backward. Custom ops without one cannot be used with SophiaH.

    Under data parallelism the sampled-label gradients (GNB) or the estimates (Hutchinson) are
    averaged across processes. The sampling uses the callback's own generator, seeded with
    ``seed`` and saved in checkpoints, so resuming is exact and the global RNG is not consumed.

    Args:
        every_n_steps: ``k``, optimizer steps between refreshes (default ``10``, the paper's).
        logits_fn: ``(pl_module, batch) -> logits`` for SophiaG (default: ``pl_module.sophia_logits``).
        loss_fn: ``(pl_module, batch) -> loss`` for SophiaH (default: ``pl_module.sophia_loss``).
        num_samples: Hutchinson probe vectors per refresh, averaged (default ``1``).
        distribution: Hutchinson probes, ``"gaussian"`` (the paper's) or ``"rademacher"``
            (default ``"gaussian"``).
        seed: seed of the sampling generator (default ``0``).

    Raises:
        ValueError: ``every_n_steps``/``num_samples`` < 1, an unknown ``distribution``; at the start
            of training, no Sophia optimizer, or the model provides neither the method nor the
            function the estimator needs (the message names both).

    Example:
        >>> class LM(OptimizerMixin, L.LightningModule):
        ...     def sophia_logits(self, batch):
        ...         x, _ = batch
        ...         return self(x)  # (batch, time, vocab)
        >>> trainer = Trainer(callbacks=[SophiaHessian(every_n_steps=10)])  # or let the mixin add it

    Paper: Liu et al., "Sophia", arXiv:2305.14342, Algorithms 1-3.
    """

    def __init__(
        self,
        *,
        every_n_steps: int = 10,
        logits_fn: Callable[[pl.LightningModule, Any], Tensor] | None = None,
        loss_fn: Callable[[pl.LightningModule, Any], Tensor] | None = None,
        num_samples: int = 1,
        distribution: Distribution = "gaussian",
        seed: int = 0,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(
                f"SophiaHessian(every_n_steps={every_n_steps!r}) is invalid; it must be an integer >= 1 (the paper uses 10)"
            )
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"SophiaHessian(num_samples={num_samples!r}) is invalid; it must be an integer >= 1")
        if distribution not in get_args(Distribution):
            raise ValueError(
                f"SophiaHessian(distribution={distribution!r}) is invalid; expected one of {get_args(Distribution)}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"SophiaHessian(seed={seed!r}) is invalid; expected an integer")
        self.every_n_steps = every_n_steps
        self.logits_fn = logits_fn
        self.loss_fn = loss_fn
        self.num_samples = num_samples
        self.distribution = distribution
        self.seed = seed
        self.refreshes = 0
        self._generators: dict[str, torch.Generator] = {}
        self._pending: dict[str, Tensor] = {}
        self._batch: Any = None
        # estimates computed for this step, applied by the optimizer's step pre-hook: id(opt) -> list
        self._estimates: dict[int, list[Tensor | None]] = {}
        self._handles: list[Any] = []

    # -- protocol
    def _estimator_fn(self, pl_module: pl.LightningModule, kind: str) -> Callable[[Any], Tensor] | None:
        if kind == "gnb":
            if self.logits_fn is not None:
                return lambda batch: self.logits_fn(pl_module, batch)
            return getattr(pl_module, "sophia_logits", None)
        if self.loss_fn is not None:
            return lambda batch: self.loss_fn(pl_module, batch)
        return getattr(pl_module, "sophia_loss", None)

    def _require_fn(self, pl_module: pl.LightningModule, kind: str) -> Callable[[Any], Tensor]:
        fn = self._estimator_fn(pl_module, kind)
        if fn is None:
            cls = type(pl_module).__name__
            if kind == "gnb":
                raise ValueError(
                    f"SophiaHessian: sophia (SophiaG) samples labels from the model's logits, but {cls} "
                    "has no `sophia_logits(self, batch) -> Tensor` method; define it (return logits of "
                    "shape (..., num_classes)) or pass SophiaHessian(logits_fn=lambda module, batch: ...)"
                )
            raise ValueError(
                f"SophiaHessian: sophia_h (SophiaH) needs a loss for Hessian-vector products, but {cls} "
                "has no `sophia_loss(self, batch) -> Tensor` method; define it or pass "
                "SophiaHessian(loss_fn=lambda module, batch: ...)"
            )
        return fn

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            if key in self._pending:
                gen.set_state(self._pending.pop(key))
            self._generators[key] = gen
        return gen

    # -- hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        found = [o for o in (sophia_optimizer(opt) for opt in trainer.optimizers) if o is not None]
        if not found:
            names = ", ".join(type(o).__name__ for o in trainer.optimizers) or "none"
            raise ValueError(
                f"SophiaHessian found no Sophia optimizer (sophia, sophia_h) among the trainer's optimizers ({names}); remove the callback or choose sophia"
            )
        for opt in found:
            self._require_fn(pl_module, opt.hessian_estimator)
            if opt.hessian_estimator == "hutchinson":
                _refuse_hutchinson_on_shards([p for g in opt.param_groups for p in g["params"]])
        self._remove_hooks()
        self._estimates = {}
        for opt in found:
            self._handles.append(opt.register_step_pre_hook(self._before_real_step))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._estimates = {}

    def _before_real_step(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # torch runs step pre-hooks before ``step`` calls its closure, and under Lightning the closure
        # (backward, then on_before_optimizer_step) computes the estimate: apply it after the closure
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:  # the closure already ran (GradScaler, SpikeGuard) or there is none
            self._apply_estimates(optimizer)
            return None

        def closure_then_apply() -> Any:
            result = closure()
            self._apply_estimates(optimizer)
            return result

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_apply}
        return (args[0], closure_then_apply, *args[2:]), kwargs

    def _apply_estimates(self, optimizer: Optimizer) -> None:
        estimates = self._estimates.pop(id(optimizer), None)
        if estimates is not None:
            with torch.no_grad():
                optimizer.update_hessian(estimates)
            self.refreshes += 1

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batch = None
        # an estimate whose step was not taken (skipped) is dropped, not applied to a later step
        self._estimates = {}

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        opt = sophia_optimizer(optimizer)
        if opt is None or self._batch is None:
            return
        # global_step counts completed optimizer steps, so this is step global_step + 1
        if trainer.global_step % self.every_n_steps != 0:
            return
        # applied by the step pre-hook, so only if the step is really taken
        self._estimates[id(opt)] = self.estimate(trainer, pl_module, opt, self._batch)

    def refresh(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer, batch: Any) -> None:
        """Compute one estimate on ``batch`` and fold it into ``optimizer``'s Hessian EMA now."""
        optimizer.update_hessian(self.estimate(trainer, pl_module, optimizer, batch))
        self.refreshes += 1

    def estimate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer, batch: Any
    ) -> list[Tensor | None]:
        """One diagonal-Hessian estimate on ``batch`` per parameter of ``optimizer`` (``None`` if frozen)."""
        kind = optimizer.hessian_estimator
        fn = self._require_fn(pl_module, kind)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        live = [i for i, p in enumerate(params) if p.requires_grad]
        estimates: list[Tensor | None] = [None] * len(params)
        # Hessian-vector products differentiate the backward: fused attention kernels (flash,
        # memory-efficient) have no double backward, so the Hutchinson forward uses the math kernel
        kernel = sdpa_kernel([SDPBackend.MATH]) if kind == "hutchinson" else contextlib.nullcontext()
        with torch.enable_grad():
            with trainer.precision_plugin.forward_context(), kernel:
                out = fn(batch)
            if kind == "gnb":
                logits = out.reshape(-1, out.shape[-1]).float()
                gen = self._generator(logits.device)
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1, generator=gen).squeeze(-1)
                loss = F.cross_entropy(logits, labels)
                if _any_dtensor([params[i] for i in live]):
                    grads = _grads_through_backward(loss, params, live)
                else:
                    grads = torch.autograd.grad(loss, [params[i] for i in live], allow_unused=True)
                    grads = [None if g is None else self._mean(trainer, g) for g in grads]
                for i, est in zip(live, gnb_estimate(grads)):
                    estimates[i] = est
            else:
                _refuse_hutchinson_on_shards(params)
                if out.dim() != 0:
                    raise ValueError(
                        f"SophiaHessian: sophia_loss/loss_fn must return a scalar, got shape {tuple(out.shape)}"
                    )
                gen = self._generator(params[live[0]].device) if live else None
                ests = hutchinson_estimate(
                    out,
                    [params[i] for i in live],
                    num_samples=self.num_samples,
                    distribution=self.distribution,
                    generator=gen,
                )
                for i, est in zip(live, ests):
                    estimates[i] = None if est is None else self._mean(trainer, est.detach())
        return estimates

    @staticmethod
    def _mean(trainer: pl.Trainer, t: Tensor) -> Tensor:
        if trainer.world_size > 1:
            return trainer.strategy.reduce(t.detach(), reduce_op="mean")
        return t.detach()

    # -- checkpointing
    def state_dict(self) -> dict[str, Any]:
        gens = {k: g.get_state() for k, g in self._generators.items()}
        return {"refreshes": self.refreshes, "generators": {**self._pending, **gens}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.refreshes = int(state_dict.get("refreshes", 0))
        self._generators = {}
        self._pending = dict(state_dict.get("generators", {}))
