"""``FP8Precision``: FP8 training of the Linear layers through plain torch, torchao or Transformer Engine.

``Trainer(plugins=[FP8Precision(backend="torch", recipe="tensorwise")])``, or in a LightningCLI YAML::

    trainer:
      plugins:
        - class_path: lightning_opt.plugins.FP8Precision
          init_args: {backend: torch, recipe: delayed}

One module selection serves every backend (:func:`select_layers`); the backends live in
``_fp8_torch.py`` (our own FP8 linear, runs on the CPU too) and ``_fp8_backends.py`` (torchao,
Transformer Engine, the device requirements).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import FSDPPrecision, Precision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from lightning_opt.plugins import _fp8_backends as backends
from lightning_opt.plugins._fp8_torch import DelayedState, FP8Linear

__all__ = ["DEFAULT_SKIP", "FP8Precision", "LayerReport", "select_layers"]

Backend = Literal["torch", "torchao", "transformer_engine"]
Recipe = Literal["tensorwise", "delayed", "rowwise", "block", "mxfp8", "rowwise_with_gw_hp", "current", "nvfp4"]
Fallback = Literal["bf16", "error"]
BasePrecision = Literal["bf16-mixed", "32-true"]

#: output heads (the last name component) and anything named like an embedding
DEFAULT_SKIP: tuple[str, ...] = (r"(^|\.)(lm_head|head|output|classifier)$", r"embed")
_HISTORY_LEN = 16


@dataclass(frozen=True)
class LayerReport:
    """One layer the plugin looked at: converted or, with the reason, left as it was."""

    name: str
    kind: str
    in_features: int
    out_features: int
    converted: bool
    reason: str


def select_layers(
    model: nn.Module,
    *,
    multiple: int,
    skip: Sequence[str] = DEFAULT_SKIP,
    skip_first: bool = False,
) -> list[LayerReport]:
    """Decide which layers run in FP8: every ``nn.Linear`` with both dims multiples of ``multiple``,
    not matched by a ``skip`` pattern (``re.search`` on the qualified name), whose weight is not tied
    to an ``nn.Embedding``, and not the first Linear when ``skip_first``.

    Subclasses of ``nn.Linear`` are left alone: their own ``forward`` (LoRA, ``MultiheadAttention``'s
    ``out_proj``, which is never called) would be lost or bypassed.
    """
    tied = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    patterns = [re.compile(p) for p in skip]
    out: list[LayerReport] = []
    first = True
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        is_first, first = first, False
        reason = ""
        hit = next((p.pattern for p in patterns if p.search(name)), None)
        if type(m) is not nn.Linear:
            reason = f"{type(m).__name__} is a subclass of nn.Linear with its own forward"
        elif hit is not None:
            reason = f"matches skip pattern {hit!r}"
        elif id(m.weight) in tied:
            reason = f"weight tied to embedding {tied[id(m.weight)]!r}"
        elif m.in_features % multiple or m.out_features % multiple:
            reason = f"dims ({m.in_features}, {m.out_features}) are not multiples of {multiple}"
        elif skip_first and is_first:
            reason = "first layer (skip_first=True)"
        out.append(LayerReport(name, "Linear", m.in_features, m.out_features, not reason, reason or "converted"))
    return out


def _root_device(module: nn.Module) -> torch.device:
    trainer = getattr(module, "_trainer", None)
    if trainer is not None:
        return trainer.strategy.root_device
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _probe(device: torch.device) -> tuple[tuple[int, int] | None, str | None]:
    """(compute capability, torch's CUDA version) of a CUDA device; (None, None) elsewhere."""
    if device.type != "cuda":
        return None, None
    return torch.cuda.get_device_capability(device), torch.version.cuda


def _dp_group(module: nn.Module) -> Any:
    """The data-parallel process group (None when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    trainer = getattr(module, "_trainer", None)
    mesh = getattr(getattr(trainer, "strategy", None), "_device_mesh", None)
    if mesh is not None and mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names:
        return mesh["data_parallel"].get_group()
    return dist.group.WORLD


class FP8Precision(FSDPPrecision):
    """FP8 matmuls in the Linear layers, the rest of the model in ``precision`` (bf16 autocast by default).

    It is an ``FSDPPrecision`` so that Lightning's ``FSDPStrategy`` accepts it; it works with the
    single-device, DDP and ``ModelParallelStrategy`` (FSDP2) strategies as well.

    Args:
        backend: ``"torch"`` (our FP8 linear, ``_fp8_torch.py``: ``torch._scaled_mm`` on GPUs of compute
            capability >= 8.9, dequantized fp32 GEMMs of the FP8 values on the CPU, so a model can be
            checked for FP8 tolerance without a GPU), ``"torchao"`` (``torchao.float8``, extra
            ``torchao``; runs on the CPU through torch's CPU ``_scaled_mm``) or ``"transformer_engine"``
            (``te.Linear``, extra ``fp8``; CUDA only).
        recipe: ``torch``: ``tensorwise`` (default), ``delayed``, ``rowwise``, ``block``, ``mxfp8``;
            ``torchao``: ``tensorwise`` (default), ``rowwise``, ``rowwise_with_gw_hp``;
            ``transformer_engine``: ``delayed`` (default, DelayedScaling), ``current``
            (Float8CurrentScaling), ``block`` (Float8BlockScaling), ``mxfp8`` (MXFP8BlockScaling),
            ``nvfp4`` (NVFP4BlockScaling).
        skip: regexes searched in the qualified module names of Linear layers kept out of FP8
            (default :data:`DEFAULT_SKIP`: output heads and embeddings; Linear layers tied to an
            ``nn.Embedding`` are always kept). A pattern that matches no Linear warns.
        skip_first: keep the model's first Linear (in registration order) out of FP8 as well.
        fallback: when the backend's package or the device's capability is missing: ``"bf16"`` warns
            (naming what is missing) and trains in bf16-mixed; ``"error"`` raises.
        precision: what the layers not in FP8 run in: ``"bf16-mixed"`` (autocast) or ``"32-true"``.
        amax_history_len: delayed scaling's amax window in steps (``recipe="delayed"`` only; default 16).
        margin: delayed scaling's headroom, scales divided by ``2**margin`` (``recipe="delayed"`` only; default 0).
        te_layernorm: also replace ``nn.LayerNorm`` by ``te.LayerNorm`` (``transformer_engine`` only;
            a LayerNorm without affine gets a frozen identity affine).
        fsdp_float8_all_gather: all-gather FP8 weights under FSDP2 (``torchao`` + ``tensorwise`` only);
            the plugin then calls ``precompute_float8_dynamic_scale_for_fsdp`` after each optimizer step.

    Attributes:
        converted: a :class:`LayerReport` per Linear (and LayerNorm with ``te_layernorm``), filled when
            the model is set up.

    Layers are converted in :meth:`convert_module` (before DDP/FSDP wrapping). Under
    ``ModelParallelStrategy`` call :meth:`convert_layers` in ``configure_model`` before ``fully_shard``::

        def configure_model(self):
            self.trainer.precision_plugin.convert_layers(self)
            for block in self.blocks:
                fully_shard(block)

    Raises:
        ValueError: an unknown backend/recipe/option, or an option the chosen backend/recipe does not use.
    """

    def __init__(
        self,
        *,
        backend: Backend = "torch",
        recipe: Recipe | None = None,
        skip: list[str] | None = None,
        skip_first: bool = False,
        fallback: Fallback = "bf16",
        precision: BasePrecision = "bf16-mixed",
        amax_history_len: int | None = None,
        margin: int | None = None,
        te_layernorm: bool = False,
        fsdp_float8_all_gather: bool = False,
    ) -> None:
        name = type(self).__name__
        for arg, value, allowed in (
            ("backend", backend, get_args(Backend)),
            ("fallback", fallback, get_args(Fallback)),
            ("precision", precision, get_args(BasePrecision)),
        ):
            if value not in allowed:
                raise ValueError(f"{name}({arg}={value!r}) is invalid; expected one of {allowed}")
        recipe = recipe if recipe is not None else backends.DEFAULT_RECIPE[backend]
        if recipe not in backends.BACKEND_RECIPES[backend]:
            raise ValueError(
                f"{name}(backend={backend!r}, recipe={recipe!r}) is invalid; backend {backend!r} has the recipes "
                f"{backends.BACKEND_RECIPES[backend]}"
            )
        for arg, value in (("skip_first", skip_first), ("te_layernorm", te_layernorm),
                           ("fsdp_float8_all_gather", fsdp_float8_all_gather)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}({arg}={value!r}) is invalid; expected a bool")
        if skip is not None:
            if isinstance(skip, str) or not all(isinstance(p, str) for p in skip):
                raise ValueError(f"{name}(skip={skip!r}) is invalid; expected a list of regex strings")
            for p in skip:
                try:
                    re.compile(p)
                except re.error as err:
                    raise ValueError(f"{name}(skip=[..., {p!r}, ...]): not a regex ({err})") from None
        delayed = recipe == "delayed" and backend in ("torch", "transformer_engine")
        for arg, value, lo in (("amax_history_len", amax_history_len, 1), ("margin", margin, 0)):
            if value is None:
                continue
            if not delayed:
                raise ValueError(f"{name}({arg}={value!r}) applies only to recipe='delayed' (got recipe={recipe!r})")
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name}({arg}={value!r}) is invalid; expected an int >= {lo}")
        if te_layernorm and backend != "transformer_engine":
            raise ValueError(f"{name}(te_layernorm=True) applies only to backend='transformer_engine'")
        if fsdp_float8_all_gather and (backend, recipe) != ("torchao", "tensorwise"):
            raise ValueError(
                f"{name}(fsdp_float8_all_gather=True) needs backend='torchao' and recipe='tensorwise' "
                f"(torchao all-gathers only tensorwise FP8 weights); got backend={backend!r}, recipe={recipe!r}"
            )
        self.backend = backend
        self.recipe = recipe
        self.skip = tuple(skip) if skip is not None else DEFAULT_SKIP
        self._user_skip = skip is not None
        self.skip_first = skip_first
        self.fallback = fallback
        self.base_precision = precision
        self.precision = precision  # what Lightning reports as trainer.precision
        self.amax_history_len = amax_history_len if amax_history_len is not None else _HISTORY_LEN
        self.margin = margin if margin is not None else 0
        self.te_layernorm = te_layernorm
        self.fsdp_float8_all_gather = fsdp_float8_all_gather
        self.scaler = None
        self._desired_input_dtype = torch.float32
        self.converted: list[LayerReport] = []
        self.active = False  # True once layers run in FP8
        self.fallback_reason: str | None = None
        self._root: nn.Module | None = None
        self._device_type = "cuda" if torch.cuda.is_available() else "cpu"
        self._layers: dict[str, nn.Module] = {}
        self._te: Any = None
        self._te_recipe: Any = None
        self._group: Any = None
        self._fsdp1 = False
        self._pending_state: dict[str, Any] | None = None

    # ----------------------------------------------------------------------------------------- setup
    @property
    def multiple(self) -> int:
        """Both dims of a converted Linear are multiples of this (16; 128 for block, 32 for MX recipes)."""
        return backends.multiple(self.backend, self.recipe)

    @property
    def fp8_flop_fraction(self) -> float:
        """The fraction of the model's Linear FLOPs that run in FP8 (0 before setup or after a fallback)."""
        linears = [r for r in self.converted if r.kind == "Linear"]
        total = sum(r.in_features * r.out_features for r in linears)
        fp8 = sum(r.in_features * r.out_features for r in linears if r.converted)
        return fp8 / total if total else 0.0

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Lightning's hook (before DDP/FSDP wrapping): convert the layers in place, once."""
        return self.convert_layers(module)

    def convert_layers(self, module: nn.Module) -> nn.Module:
        """Check the device, then swap the selected layers for FP8 ones, in place; a second call is a no-op.

        Call it in ``configure_model`` before ``fully_shard`` under ``ModelParallelStrategy``.

        Raises:
            RuntimeError: the selected layers are already sharded (DTensor parameters), or a requirement
                is missing with ``fallback="error"`` (ModuleNotFoundError for a missing package).
        """
        if self._root is module:
            return module
        device = _root_device(module)
        self._device_type = device.type
        selection = select_layers(module, multiple=self.multiple, skip=self.skip, skip_first=self.skip_first)
        norms = self._select_norms(module)
        reason, missing_package = self._requirement(device)
        if reason is not None:
            msg = f"FP8Precision(backend={self.backend!r}, recipe={self.recipe!r}): {reason}"
            if self.fallback == "error":
                raise (ModuleNotFoundError if missing_package else RuntimeError)(
                    f"{msg} (fallback='error'; fallback='bf16' trains in bf16-mixed instead)"
                )
            warnings.warn(f"{msg}; training in bf16-mixed instead (fallback='bf16')", stacklevel=2)
            self.fallback_reason = reason
            self.precision = "bf16-mixed"
            self.converted = [
                LayerReport(r.name, r.kind, r.in_features, r.out_features, False, f"fallback to bf16-mixed: {reason}")
                for r in selection
            ]
            self._root = module
            return module
        # fully_shard makes a Linear an FSDPLinear subclass: it would have been converted
        self._refuse_sharded(module, [r.name for r in selection if r.converted or "subclass" in r.reason] + norms)
        self._warn_selection(module, selection)
        chosen = [r.name for r in selection if r.converted]
        self._group = _dp_group(module)
        if self.backend == "torch":
            matmul = "scaled_mm" if device.type == "cuda" else "dequantized"
            self._layers = dict(
                backends.convert_torch(
                    module, chosen, recipe=self.recipe, matmul=matmul,
                    amax_history_len=self.amax_history_len, margin=self.margin,
                )
            )
        elif self.backend == "torchao":
            self._layers = backends.convert_torchao(
                module, chosen, recipe=self.recipe, fsdp_float8_all_gather=self.fsdp_float8_all_gather
            )
        else:
            self._layers = backends.convert_te(self._te, module, chosen, norms)
            selection += [LayerReport(n, "LayerNorm", 0, 0, True, "converted") for n in norms]
        self.converted = selection
        self.active = bool(self._layers)
        self._root = module
        done = sum(r.converted for r in selection)
        rank_zero_info(
            f"FP8Precision(backend={self.backend!r}, recipe={self.recipe!r}): {done} of {len(selection)} layers in FP8 "
            f"({self.fp8_flop_fraction:.0%} of Linear FLOPs); kept: "
            + (", ".join(f"{r.name} ({r.reason})" for r in selection if not r.converted) or "none")
        )
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)
        return module

    def _requirement(self, device: torch.device) -> tuple[str | None, bool]:
        """(what is missing, whether it is a package) for this backend on ``device``."""
        try:
            if self.backend == "torchao":
                backends.import_torchao()
            elif self.backend == "transformer_engine":
                self._te, recipe_mod = backends.import_te()
                self._te_recipe = backends.te_recipe(
                    recipe_mod, self.recipe, amax_history_len=self.amax_history_len, margin=self.margin
                )
        except ModuleNotFoundError as err:
            return str(err), True
        if (self.backend, self.recipe, self.precision, device.type) == ("torchao", "rowwise_with_gw_hp", "bf16-mixed", "cpu"):
            # torchao 0.18 casts its input to the autocast dtype only under CUDA autocast; its high-precision
            # weight-gradient matmul then mixes bf16 and fp32 and raises
            return "torchao's rowwise_with_gw_hp fails under CPU bf16 autocast; use precision='32-true' on the CPU", False
        capability, cuda = _probe(device)
        return backends.requirement(self.backend, self.recipe, device, capability, cuda), False

    def _select_norms(self, module: nn.Module) -> list[str]:
        if not self.te_layernorm:
            return []
        return [
            n for n, m in module.named_modules()
            if type(m) is nn.LayerNorm and len(m.normalized_shape) == 1 and m.normalized_shape[0] % self.multiple == 0
        ]

    def _warn_selection(self, module: nn.Module, selection: list[LayerReport]) -> None:
        if self._user_skip:
            names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
            for p in self.skip:
                if not any(re.search(p, n) for n in names):
                    warnings.warn(f"FP8Precision(skip=[..., {p!r}, ...]) matches no nn.Linear", stacklevel=3)
        if any(r.converted for r in selection):
            return
        eligible = [r for r in selection if "not multiples" not in r.reason and "subclass" not in r.reason]
        if eligible:
            warnings.warn(
                f"FP8Precision: every FP8-eligible Linear is skipped ({', '.join(f'{r.name}: {r.reason}' for r in eligible)});"
                " nothing runs in FP8",
                stacklevel=3,
            )
        else:
            warnings.warn(
                f"FP8Precision: no nn.Linear with both dims multiples of {self.multiple}; nothing runs in FP8",
                stacklevel=3,
            )

    @staticmethod
    def _refuse_sharded(module: nn.Module, names: list[str]) -> None:
        from torch.distributed.tensor import DTensor

        sharded = [
            n for n in names if any(isinstance(p, DTensor) for p in module.get_submodule(n).parameters(recurse=False))
        ]
        if sharded:
            raise RuntimeError(
                f"FP8Precision: the layers {sharded[:3]}{'...' if len(sharded) > 3 else ''} are already sharded "
                "(DTensor parameters); FP8 layers must be swapped in before fully_shard: call "
                "`self.trainer.precision_plugin.convert_layers(self)` at the start of configure_model"
            )

    # ------------------------------------------------------------------------------------ training
    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        with contextlib.ExitStack() as stack:
            if self.precision == "bf16-mixed":
                stack.enter_context(torch.autocast(self._device_type, dtype=torch.bfloat16))
            if self.active and self.backend == "transformer_engine":
                stack.enter_context(backends.te_autocast(self._te, self._te_recipe, self._group))
            yield

    def convert_input(self, data: Any) -> Any:
        return data

    def convert_output(self, data: Any) -> Any:
        return data

    def tensor_init_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def module_init_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @property
    def mixed_precision_config(self) -> Any:
        """FSDP1's MixedPrecision (read by Lightning's FSDPStrategy): bf16 or fp32 compute; buffers kept."""
        from torch.distributed.fsdp import MixedPrecision

        self._fsdp1 = True
        dtype = torch.bfloat16 if self.precision == "bf16-mixed" else torch.float32
        return MixedPrecision(param_dtype=dtype, reduce_dtype=dtype, buffer_dtype=None)

    def clip_grad_by_norm(self, optimizer: Any, clip_val: int | float) -> None:
        if self._fsdp1:  # FSDP1 needs its root module's clip_grad_norm_, as FSDPPrecision says
            raise MisconfigurationException(
                f"`gradient_clip_algorithm='norm'` is not supported for `{type(self).__name__}` under FSDPStrategy"
            )
        Precision.clip_grad_by_norm(self, optimizer, clip_val)

    def pre_backward(self, tensor: torch.Tensor, module: Any) -> torch.Tensor:  # type: ignore[override]
        return Precision.pre_backward(self, tensor, module)

    def optimizer_step(self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:  # type: ignore[override]
        out = Precision.optimizer_step(self, optimizer, model=model, closure=closure, **kwargs)
        self.after_optimizer_step()
        return out

    def after_optimizer_step(self) -> None:
        """Delayed scaling: reduce the step's amaxes over the data-parallel ranks (one all-reduce), new scales.
        torchao with FP8 all-gather: precompute the weights' scales for the next all-gather."""
        if not self.active:
            return
        states = self._delayed_states()
        if states:
            cur = torch.stack([s.amax_history[:, 0] for s in states.values()])
            if self._group is not None:
                dist.all_reduce(cur, op=dist.ReduceOp.MAX, group=self._group)
            for s, row in zip(states.values(), cur):
                s.amax_history[:, 0] = row
                s.update()
        if self.backend == "torchao" and self.fsdp_float8_all_gather:
            backends.import_torchao().precompute_float8_dynamic_scale_for_fsdp(self._root)

    def _delayed_states(self) -> dict[str, DelayedState]:
        return {
            n: m.fp8_state for n, m in self._layers.items() if isinstance(m, FP8Linear) and m.fp8_state is not None
        }

    # --------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The recipe and, for delayed scaling, every layer's amax history and scales."""
        return {
            "backend": self.backend,
            "recipe": self.recipe,
            "active": self.active,
            "layers": {n: s.state_dict() for n, s in self._delayed_states().items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the FP8 state; another backend/recipe, or a run not in FP8, loads nothing and warns."""
        if self._root is None:  # before setup: applied when the layers exist
            self._pending_state = state_dict
            return
        saved = (state_dict.get("backend"), state_dict.get("recipe"), bool(state_dict.get("active")))
        if saved != (self.backend, self.recipe, self.active):
            warnings.warn(
                f"FP8Precision: the checkpoint's FP8 state is for backend={saved[0]!r}, recipe={saved[1]!r}"
                f"{'' if saved[2] else ' (not in FP8)'}; this run uses backend={self.backend!r}, recipe={self.recipe!r}"
                f"{'' if self.active else ' (not in FP8)'}: the weights load as they are, the FP8 scaling state "
                "starts fresh",
                stacklevel=2,
            )
            return
        ours, theirs = self._delayed_states(), state_dict.get("layers", {})
        missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        if missing or extra:
            warnings.warn(
                f"FP8Precision: FP8 state missing for {missing} (they start fresh), unused for {extra}", stacklevel=2
            )
        for n in set(ours) & set(theirs):
            ours[n].load_state_dict(theirs[n])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if type(self).__qualname__ not in checkpoint and self.active:
            warnings.warn(
                "FP8Precision: the checkpoint was saved without FP8Precision: the weights load as they are, the FP8 "
                "scaling state starts fresh",
                stacklevel=2,
            )
