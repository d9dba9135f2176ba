"""``BF16Precision``: bfloat16 training with master weights, Kahan-compensated or stochastically rounded updates.

Lightning's ``bf16-true`` stores the weights in bfloat16 and keeps no master copy, so an update below
half a bf16 ulp of its weight (a weight ~1 moving by 1e-4 when the ulp is 2^-7 ~ 0.0078) is rounded
away every step and training stalls. This plugin keeps the update precise in one of four ways
(``master_weights``) and works with every optimizer, including ones that know nothing about it:

===============  ================================================  ==============================
master_weights   what happens after each optimizer step            persistent memory (vs "none")
===============  ================================================  ==============================
``"fp32"``       the optimizer steps a float32 copy (its state is  +4 B/param (the copy), plus the
                 that copy's: float32); the copy is rounded to     optimizer state in float32
                 nearest even into the bf16 weight
``"kahan"``      the update is added with Kahan compensation: the  +2 B/param (a bf16 buffer)
                 part rounding lost waits in a bf16 buffer and is  (see below for optimizers
                 added back next step (Zamirai et al. 2020)        without a kahan_sum option)
``"stochastic"`` the updated weight is rounded up with            +0 (ours round their own store;
                 probability equal to the remainder, so small      the staged path keeps state
                 updates survive in expectation                    in float32, see below)
``"none"``       plain bf16 (what ``bf16-true`` does)              +0
===============  ================================================  ==============================

How each optimizer is served (one shared precision service, :mod:`lightning_opt.optim.precision`):

- **Native** (``"kahan"`` and ``"stochastic"``): an optimizer whose param groups have a ``kahan_sum``
  / ``stochastic_rounding`` option (lion, lamb, lars, stable_adamw, grokadamw, sophia, the
  schedule-free ones) gets it switched on in every group and rounds its own final store; its state
  stays in its own dtype policy, the compensation buffer is its ``kahan_comp`` state, and its
  stochastic bits are seeded by the tensor's step count (fresh every step).
- **Staged** (``"fp32"`` for every optimizer, ``"kahan"``/``"stochastic"`` for the rest):
  during ``step`` each bf16 parameter with a gradient is replaced in the optimizer's param groups by
  a float32 stand-in (the master copy for ``"fp32"``, the bf16 value widened for the others)
  carrying a float32 gradient, and its optimizer state is keyed to the stand-in; after the step the
  stand-in's value is written back: rounded to nearest from the master (``"fp32"``), its change
  added with :func:`~lightning_opt.optim.precision.apply_update_` and a bf16 ``bf16_comp`` buffer
  (``"kahan"``), or rounded by :func:`~lightning_opt.optim.precision.stochastic_round` seeded with the
  parameter's count of roundings (``"stochastic"``; an int ``bf16_sr_step`` in the state).
  State is float32 while the optimizer steps and stays float32 where the optimizer created it
  during a staged step, except that under ``"kahan"``/``"stochastic"`` the state torch's own
  optimizers create like the parameter (AdamW's moments, SGD's momentum, ...) is stored in bf16
  between steps, as without the plugin; state that was bf16 before a step goes back to bf16. The
  stand-ins, the float32 gradients and the widened state exist only during the step (transient).
  docs/BENCHMARKS.md has the measured bytes per parameter of each mode and optimizer.

The master copy (``bf16_master``) and the compensation buffers (``bf16_comp``, or the optimizer's
own ``kahan_comp``) live in the optimizer's state, so they round-trip through every checkpoint
(Lightning's, ``torch.distributed.checkpoint`` under FSDP2, where they are DTensors like the
parameter) and are kept in their saved dtypes on load. A bf16 weight changed outside the step
(loaded weights, the schedule-free train/eval switch, user code) re-seeds its master copy elementwise
from the new value, so a master never silently undoes such a change.

``mode="mixed"`` is ``torch.autocast`` to bfloat16 over float32 parameters (what ``bf16-mixed``
does); the float32 parameters are their own master weights.

Gradients are accumulated (``accumulate_grad_batches``) and clipped (``gradient_clip_val``) in the
parameters' dtype, bfloat16 under ``mode="true"``, before the step, exactly as with ``bf16-true``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Generator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Literal, get_args

import torch
from lightning.pytorch.plugins.precision import Precision
from lightning_utilities import apply_to_collection
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_opt.optim.precision import (
    apply_update_,
    keep_state_dtype_on_load,
    local,
    new_kahan_comp,
    stochastic_round,
)

__all__ = ["COMP_KEY", "MASTER_KEY", "SEED_KEY", "BF16Precision", "MasterWeights", "Mode"]

Mode = Literal["mixed", "true"]
MasterWeights = Literal["fp32", "kahan", "stochastic", "none"]

#: optimizer-state keys this plugin owns: the float32 master copy, the Kahan buffer of the staged
#: path, the count of stochastic roundings (the seed that keeps their bits fresh every step)
MASTER_KEY = "bf16_master"
COMP_KEY = "bf16_comp"
SEED_KEY = "bf16_sr_step"
_ALL_KEYS = (MASTER_KEY, COMP_KEY, SEED_KEY)
_OWN_KEYS = {"fp32": (MASTER_KEY,), "kahan": (COMP_KEY,), "stochastic": (SEED_KEY,), "none": ()}
# the group option that serves a mode natively (an optimizer that has it rounds its own store;
# its stochastic rounding is seeded by the tensor's step count, as the staged path's by its count)
_NATIVE_OPTION = {"kahan": "kahan_sum", "stochastic": "stochastic_rounding"}

# torch's optimizers create these state tensors like the parameter (bf16 for a bf16 parameter);
# under "kahan"/"stochastic" the staged path stores them in the parameter's dtype between steps,
# so those modes cost what they would cost without the plugin plus their own buffers
_LIKE_PARAM_STATE: dict[type[Optimizer], tuple[str, ...]] = {
    torch.optim.AdamW: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    torch.optim.Adam: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    torch.optim.SGD: ("momentum_buffer",),
    torch.optim.Adagrad: ("sum",),
    torch.optim.RMSprop: ("square_avg", "momentum_buffer", "grad_avg"),
    torch.optim.RAdam: ("exp_avg", "exp_avg_sq"),
    torch.optim.NAdam: ("exp_avg", "exp_avg_sq"),
    torch.optim.Adafactor: ("row_var", "col_var", "variance"),
}

_BF16 = torch.bfloat16


def _is_norm(module: nn.Module) -> bool:
    """A normalization layer: torch's (LayerNorm, RMSNorm, GroupNorm, BatchNorm, InstanceNorm,
    LocalResponseNorm) or any module whose class name ends in ``Norm`` (``LlamaRMSNorm``)."""
    torch_norms = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)
    rms = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
    return isinstance(module, torch_norms + rms) or type(module).__name__.endswith("Norm")


def _is_plain(t: Tensor) -> bool:
    return type(t) in (Tensor, nn.Parameter)


def _cast_floating(dtype: torch.dtype, src: tuple[torch.dtype, ...]) -> Callable[[Any], Any]:
    def cast(data: Any) -> Any:
        return apply_to_collection(data, Tensor, lambda t: t.to(dtype) if t.dtype in src else t)

    return cast


_to_fp32 = _cast_floating(torch.float32, (torch.bfloat16, torch.float16))
_to_bf16 = _cast_floating(_BF16, (torch.float32,))


def _keep_pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    return _to_fp32(args), _to_fp32(kwargs)


def _keep_post_hook(module: nn.Module, args: Any, output: Any) -> Any:
    return _to_bf16(output)


class _DefaultDtype:
    """Context manager: ``torch.get_default_dtype()`` is ``dtype`` inside (floating tensors created there)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.saved: list[torch.dtype] = []

    def __enter__(self) -> None:
        self.saved.append(torch.get_default_dtype())
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc: object) -> None:
        torch.set_default_dtype(self.saved.pop())


class BF16Precision(Precision):
    """bfloat16 training: ``autocast`` (``mode="mixed"``) or bf16 weights with precise updates (``mode="true"``).

    Use it as ``Trainer(plugins=[BF16Precision(mode="true", master_weights="kahan")])`` or from
    LightningCLI YAML::

        trainer:
          plugins:
            - class_path: lightning_opt.plugins.BF16Precision
              init_args: {mode: "true", master_weights: kahan}

    Args:
        mode: ``"true"`` (default): parameters, gradients and activations in bfloat16, except the
            modules kept in float32; ``"mixed"``: ``torch.autocast(dtype=bfloat16)`` over float32
            parameters (Lightning's ``bf16-mixed``).
        master_weights: how a bf16 weight takes its update (``mode="true"`` only; see the module
            docstring): ``"fp32"`` (default; a float32 master copy, +4 B/param and float32 optimizer
            state), ``"kahan"`` (a bf16 compensation buffer, +2 B/param), ``"stochastic"``
            (stochastic rounding, no buffer) or ``"none"`` (plain bf16, updates below half an ulp
            are lost).
        keep_fp32: regular expressions (``re.search``) of module names kept in float32 with their
            whole subtree (parameters, buffers and computation: floating inputs are cast to float32
            and outputs back to bfloat16). ``None`` (default) keeps every normalization layer
            (LayerNorm, RMSNorm, GroupNorm, BatchNorm, InstanceNorm, or a class named ``*Norm``);
            ``[]`` keeps nothing; a list replaces the default and each pattern must match a module.
        keep_embeddings_fp32: also keep every ``nn.Embedding``/``nn.EmbeddingBag`` in float32
            (default ``False``).

    Raises:
        ValueError: an unknown ``mode`` or ``master_weights``; ``master_weights`` other than
            ``"fp32"``, ``keep_fp32`` or ``keep_embeddings_fp32`` with ``mode="mixed"`` (float32
            parameters are their own master weights and autocast picks each op's dtype); a pattern
            that is not a valid regex (here) or matches no module (when the model is converted); an
            optimizer whose own rounding option contradicts ``master_weights``.
        TypeError: an option of the wrong type.

    Example:
        >>> trainer = L.Trainer(plugins=[BF16Precision(mode="true", master_weights="kahan")])
        >>> trainer.fit(TinyGPT(optimizer=OptimizerConfig("adamw", lr=3e-4)), CharDataModule())

    Under FSDP2 (``fully_shard`` in ``configure_model`` under ``ModelParallelStrategy``) pass
    :meth:`fsdp_mp_policy` to ``fully_shard``; the master copies and buffers are DTensors sharded
    like their parameters. ``FSDPStrategy`` (FSDP1) accepts only Lightning's ``FSDPPrecision``.
    """

    def __init__(
        self,
        *,
        mode: Mode = "true",
        master_weights: MasterWeights = "fp32",
        keep_fp32: list[str] | None = None,
        keep_embeddings_fp32: bool = False,
    ) -> None:
        if mode not in get_args(Mode):
            raise ValueError(f"BF16Precision(mode={mode!r}) is invalid; expected one of {get_args(Mode)}")
        if master_weights not in get_args(MasterWeights):
            raise ValueError(
                f"BF16Precision(master_weights={master_weights!r}) is invalid; expected one of {get_args(MasterWeights)}"
            )
        if not isinstance(keep_embeddings_fp32, bool):
            raise TypeError(f"BF16Precision(keep_embeddings_fp32={keep_embeddings_fp32!r}) must be a bool")
        if keep_fp32 is not None:
            if isinstance(keep_fp32, str) or not isinstance(keep_fp32, Sequence):
                raise TypeError(f"BF16Precision(keep_fp32={keep_fp32!r}) must be a list of regexes or None")
            for pattern in keep_fp32:
                if not isinstance(pattern, str):
                    raise TypeError(f"BF16Precision(keep_fp32=[..., {pattern!r}]): each pattern must be a string")
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"BF16Precision(keep_fp32=[..., {pattern!r}]) is not a valid regex: {err}") from err
            keep_fp32 = list(keep_fp32)
        if mode == "mixed":
            given = [
                f"{k}={v!r}"
                for k, v, default in (
                    ("master_weights", master_weights, "fp32"),
                    ("keep_fp32", keep_fp32, None),
                    ("keep_embeddings_fp32", keep_embeddings_fp32, False),
                )
                if v != default
            ]
            if given:
                raise ValueError(
                    f"BF16Precision(mode='mixed', {', '.join(given)}) is invalid: mixed mode keeps float32 "
                    "parameters (their own master weights) and autocast picks each op's dtype; these options "
                    "apply to mode='true'"
                )
        self.mode = mode
        self.master_weights = master_weights
        self.keep_fp32 = keep_fp32
        self.keep_embeddings_fp32 = keep_embeddings_fp32
        self.precision = "bf16-mixed" if mode == "mixed" else "bf16-true"  # type: ignore[assignment]
        self._device_type: str | None = None
        self._shells: dict[Tensor, nn.Parameter] = {}  # per parameter: the float32 stand-in object
        self._purged: set[int] = set()  # optimizers whose buffers of other settings are dropped
        self._staging = False  # inside a staged step (the state is keyed to the stand-ins)

    def __repr__(self) -> str:
        return f"BF16Precision(mode={self.mode!r}, master_weights={self.master_weights!r})"

    # ----------------------------------------------------------------------------------- model
    def kept_modules(self, module: nn.Module) -> dict[str, nn.Module]:
        """The outermost modules of ``module`` kept in float32 (name -> module), under ``mode="true"``.

        Raises:
            ValueError: a ``keep_fp32`` pattern that matches no module name.
        """
        if self.mode == "mixed":
            return {}
        named = list(module.named_modules())
        matched: dict[str, nn.Module] = {}
        if self.keep_fp32 is None:
            matched.update((n, m) for n, m in named if _is_norm(m))
        else:
            for pattern in self.keep_fp32:
                hits = [(n, m) for n, m in named if n and re.search(pattern, n)]
                if not hits:
                    sample = ", ".join(n for n, _ in named[1:6])
                    raise ValueError(
                        f"BF16Precision(keep_fp32=[..., {pattern!r}]) matches no module of {type(module).__name__}"
                        f" (module names look like: {sample})"
                    )
                matched.update(hits)
        if self.keep_embeddings_fp32:
            matched.update((n, m) for n, m in named if isinstance(m, (nn.Embedding, nn.EmbeddingBag)))
        # outermost only: a kept module's children go with it
        return {n: m for n, m in matched.items() if not any(n != o and n.startswith(o + ".") for o in matched if o)}

    def convert_module(self, module: nn.Module) -> nn.Module:
        """``mode="true"``: floating parameters and buffers to bfloat16, the kept modules to float32.

        Each kept module computes in float32: its floating inputs are cast to float32 and its
        outputs back to bfloat16 (forward hooks, added once). Idempotent.
        """
        if self.mode == "mixed":
            return module
        kept = self.kept_modules(module)
        kept_ids = {id(m) for top in kept.values() for m in top.modules()}
        for sub in module.modules():
            dtype = torch.float32 if id(sub) in kept_ids else _BF16
            sub._apply(lambda t, dtype=dtype: t.to(dtype) if t.is_floating_point() else t, recurse=False)
        for top in kept.values():
            if not getattr(top, "_bf16_keep_fp32_hooks", False):
                top.register_forward_pre_hook(_keep_pre_hook, with_kwargs=True)
                top.register_forward_hook(_keep_post_hook)
                top._bf16_keep_fp32_hooks = True
        return module

    def fsdp_mp_policy(self, *, reduce_dtype: torch.dtype = torch.float32) -> Any:
        """The ``MixedPrecisionPolicy`` to give FSDP2's ``fully_shard`` with this plugin.

        ``mode="mixed"``: float32 shards (the master weights) gathered in bf16; ``mode="true"``: bf16
        shards gathered as they are. Gradients are reduced in ``reduce_dtype`` (float32 default).
        """
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=_BF16 if self.mode == "mixed" else None, reduce_dtype=reduce_dtype)

    def tensor_init_context(self) -> AbstractContextManager:
        return _DefaultDtype(_BF16) if self.mode == "true" else nullcontext()

    def module_init_context(self) -> AbstractContextManager:
        return self.tensor_init_context()

    @contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        """``mode="mixed"``: autocast to bfloat16; ``mode="true"``: bfloat16 default dtype."""
        if self.mode == "mixed":
            device = self._device_type or ("cuda" if torch.cuda.is_available() else "cpu")
            with torch.autocast(device, dtype=_BF16, cache_enabled=False):
                yield
        else:
            with _DefaultDtype(_BF16):
                yield

    def convert_input(self, data: Any) -> Any:
        if self.mode == "mixed":
            return data
        return apply_to_collection(data, Tensor, lambda t: t.to(_BF16) if t.is_floating_point() else t)

    # ------------------------------------------------------------------------------- optimizer
    def connect(self, model: nn.Module, optimizers: list[Optimizer], lr_schedulers: list[Any]) -> tuple[Any, ...]:
        p = next(iter(model.parameters()), None)
        if p is not None:
            self._device_type = p.device.type
        for opt in optimizers:
            self.prepare_optimizer(opt)
        return model, optimizers, lr_schedulers

    def route(self, optimizer: Optimizer) -> Literal["plain", "native", "staged"]:
        """How ``optimizer``'s bf16 updates are served: ``"plain"`` (nothing to do), ``"native"``
        (its own rounding option) or ``"staged"`` (float32 stand-ins during the step)."""
        mw = self.master_weights
        if self.mode == "mixed" or mw == "none":
            return "plain"
        option = _NATIVE_OPTION.get(mw)
        if option is not None and optimizer.param_groups and all(option in g for g in optimizer.param_groups):
            return "native"
        return "staged"

    def prepare_optimizer(self, optimizer: Optimizer) -> None:
        """Switch a native optimizer's rounding option on, or ready the staged path (load hooks).

        Called by Lightning when the plugin connects; call it yourself outside a Trainer.

        Raises:
            ValueError: the optimizer's groups already use the other rounding option.
            TypeError: an optimizer that re-evaluates its closure (LBFGS) on the staged path.
        """
        route = self.route(optimizer)
        if route == "native":
            option = _NATIVE_OPTION[self.master_weights]
            (other_mode, other), = ((m, o) for m, o in _NATIVE_OPTION.items() if o != option)
            for i, group in enumerate(optimizer.param_groups):
                if group.get(other):
                    raise ValueError(
                        f"{self!r} switches {option}=True on {type(optimizer).__name__}, but its param group {i} has "
                        f"{other}=True; drop {other} from the optimizer's options or use "
                        f"master_weights={other_mode!r}"
                    )
            for group in optimizer.param_groups:  # after every group passed: a refusal changes nothing
                group[option] = True
        if self.mode == "true":
            inner = getattr(optimizer, "base_optimizer", optimizer)  # Lookahead loads through its base
            if not getattr(inner, "_bf16_keeps_state_dtype", False):
                # torch's load_state_dict casts all floating state of a bf16 weight to bf16: the float32
                # masters, the float32 state of the staged path, float32 scalars (NAdam's mu_product)
                keep_state_dtype_on_load(inner)
                inner._bf16_keeps_state_dtype = True
            keys = getattr(inner, "non_castable_tensor_keys", None)
            if isinstance(keys, set):  # bitsandbytes' own load_state_dict casts every other tensor
                keys.update((MASTER_KEY, COMP_KEY))
        if route == "staged":
            if isinstance(optimizer, torch.optim.LBFGS):
                raise TypeError(
                    f"{self!r} steps float32 stand-ins of the bf16 weights, which LBFGS's closure re-evaluations "
                    "cannot see; use master_weights='none' or mode='mixed' with LBFGS"
                )
            if not getattr(optimizer, "_bf16_buffer_hook", False):
                # a step that bypasses the plugin (torch.distributed.checkpoint's zero-lr step that builds
                # the state template a checkpoint loads into) must leave the buffers in the state too, or
                # the load skips them
                optimizer.register_step_post_hook(lambda opt, args, kwargs: self._ensure_buffers(opt))
                optimizer._bf16_buffer_hook = True

    def optimizer_step(  # type: ignore[override]
        self,
        optimizer: Optimizer,
        model: Any,
        closure: Callable[[], Any],
        **kwargs: Any,
    ) -> Any:
        if self.route(optimizer) != "staged":
            self._purge_foreign(optimizer)
            if self.route(optimizer) == "native":
                self.prepare_optimizer(optimizer)  # groups added since connect
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        # the closure (forward, backward, on_before_optimizer_step, clipping) runs first, as under
        # AMP's scaler: the stand-ins are made from the finished gradients
        closure_result = self._wrap_closure(model, optimizer, closure)
        self.step(optimizer, **kwargs)
        return closure_result

    def step(self, optimizer: Optimizer, **kwargs: Any) -> Any:
        """One ``optimizer.step(**kwargs)`` with this plugin's handling of the bf16 weights.

        Lightning calls it from :meth:`optimizer_step` after the closure; outside a Trainer call
        :meth:`prepare_optimizer` once, then this after ``backward()`` instead of ``optimizer.step()``.
        """
        route = self.route(optimizer)
        self._purge_foreign(optimizer)
        if route != "staged":
            if route == "native":
                self.prepare_optimizer(optimizer)
            return optimizer.step(**kwargs)
        staged = self._stage(optimizer)
        self._staging = True
        try:
            result = optimizer.step(**kwargs)
        except BaseException:
            self._unstage(optimizer, staged, write=False)
            raise
        finally:
            self._staging = False
        self._unstage(optimizer, staged, write=True)
        return result

    def _ensure_buffers(self, optimizer: Optimizer) -> None:
        """Give every bf16 parameter that has optimizer state the buffers of this setting."""
        if getattr(self, "_staging", False) or self.route(optimizer) != "staged":
            return
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    st = optimizer.state.get(p)
                    if p.dtype != _BF16 or not st:
                        continue
                    if self.master_weights == "fp32" and MASTER_KEY not in st:
                        st[MASTER_KEY] = p.detach().float()
                    elif self.master_weights == "kahan" and COMP_KEY not in st:
                        st[COMP_KEY] = new_kahan_comp(p)
                    elif self.master_weights == "stochastic":
                        st.setdefault(SEED_KEY, 0)

    def _purge_foreign(self, optimizer: Optimizer) -> None:
        # buffers of another master_weights setting (a checkpoint from another run) are dropped once
        if id(optimizer) in self._purged:
            return
        own = set(_OWN_KEYS[self.master_weights]) if self.mode == "true" else set()
        foreign = set(_ALL_KEYS) - own
        for st in optimizer.state.values():
            for key in foreign:
                st.pop(key, None)
        self._purged.add(id(optimizer))

    def _like_param_keys(self, optimizer: Optimizer) -> tuple[str, ...]:
        if self.master_weights not in ("kahan", "stochastic"):
            return ()
        inner = getattr(optimizer, "base_optimizer", optimizer)
        for cls in type(inner).__mro__:
            if cls in _LIKE_PARAM_STATE:
                return _LIKE_PARAM_STATE[cls]
        return ()

    def _stage(self, optimizer: Optimizer) -> list[tuple[Any, ...]]:
        """Swap every bf16 parameter with a gradient for a float32 stand-in (state re-keyed to it)."""
        state = optimizer.state
        staged: list[tuple[Any, ...]] = []
        with torch.no_grad():
            for group in optimizer.param_groups:
                params = group["params"]
                for i, p in enumerate(params):
                    if p.dtype != _BF16 or p.grad is None:
                        continue
                    st = state.pop(p, None) or {}
                    own = {k: st.pop(k) for k in _ALL_KEYS if k in st}
                    if self.master_weights == "fp32":
                        value = own.get(MASTER_KEY)
                        if value is None or value.dtype != torch.float32:
                            value = p.detach().float()
                        else:
                            # re-seed elements changed outside the step (loaded weights, user code)
                            lm, lp = local(value), local(p)
                            lm.copy_(torch.where(lp == lm.to(lp.dtype), lm, lp.float()))
                        own[MASTER_KEY] = value
                    else:
                        value = p.detach().float()
                    widened = [
                        k for k, v in st.items() if isinstance(v, Tensor) and v.dtype == p.dtype and v.is_floating_point()
                    ]
                    for k in widened:
                        st[k] = st[k].float()
                    if _is_plain(p):
                        shell = self._shells.get(p)
                        if shell is None:
                            shell = self._shells[p] = nn.Parameter(torch.empty(0), requires_grad=p.requires_grad)
                        shell.data = value  # shares value's storage: the optimizer steps it in place
                    else:
                        shell = nn.Parameter(value, requires_grad=p.requires_grad)  # a DTensor view of value
                    shell.grad = p.grad.float()
                    if st:
                        state[shell] = st
                    params[i] = shell
                    staged.append((params, i, p, shell, value, own, widened))
        return staged

    def _unstage(self, optimizer: Optimizer, staged: list[tuple[Any, ...]], *, write: bool) -> None:
        """Put the bf16 parameters back (after a step: with their updates) and their state under them."""
        state = optimizer.state
        like_param = self._like_param_keys(optimizer)
        with torch.no_grad():
            for params, i, p, shell, value, own, widened in staged:
                params[i] = p
                st = state.pop(shell, None) or {}
                if write:
                    if self.master_weights == "fp32":
                        local(p).copy_(local(value))  # round to nearest even
                    elif self.master_weights == "kahan":
                        comp = own.get(COMP_KEY)
                        if comp is None:
                            comp = own[COMP_KEY] = new_kahan_comp(p)
                        apply_update_(local(p), local(value) - local(p).float(), local(comp))
                    else:
                        own[SEED_KEY] = own.get(SEED_KEY, 0) + 1
                        local(p).copy_(stochastic_round(local(value), seed=own[SEED_KEY]))
                narrow = set(widened) | {k for k in like_param if isinstance(st.get(k), Tensor)}
                for k in narrow:
                    if k in st and st[k].is_floating_point():
                        st[k] = st[k].to(p.dtype)
                st.update(own)
                if st:
                    state[p] = st
                shell.grad = None
                if _is_plain(p):
                    shell.data = torch.empty(0)

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The settings the optimizer-state buffers were made under (the buffers are optimizer state)."""
        return {"mode": self.mode, "master_weights": self.master_weights}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warn when the checkpoint was trained with other settings; their buffers are then dropped."""
        saved = (state_dict.get("mode"), state_dict.get("master_weights"))
        if saved != (self.mode, self.master_weights):
            warnings.warn(
                f"the checkpoint was trained with BF16Precision(mode={saved[0]!r}, master_weights={saved[1]!r}); "
                f"continuing with {self!r}: buffers of the old setting are dropped, new ones start from the "
                "loaded bf16 weights (fp32 masters) or zero (Kahan)",
                stacklevel=2,
            )
        self._purged.clear()

    def teardown(self) -> None:
        self._shells.clear()
