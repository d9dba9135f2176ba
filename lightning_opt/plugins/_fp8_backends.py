"""The FP8 backends of :class:`~lightning_opt.plugins.fp8.FP8Precision`: what each needs, how it converts.

Every backend converts the layers :func:`~lightning_opt.plugins.fp8.select_layers` chose and nothing
else; ``torchao`` and ``transformer_engine`` are imported here, lazily, only when a plugin uses them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_opt.plugins._fp8_torch import RECIPES as TORCH_RECIPES
from lightning_opt.plugins._fp8_torch import FP8Linear

__all__ = [
    "BACKEND_RECIPES",
    "DEFAULT_RECIPE",
    "convert_te",
    "convert_torch",
    "convert_torchao",
    "import_te",
    "import_torchao",
    "multiple",
    "requirement",
    "te_autocast",
    "te_recipe",
]

BACKEND_RECIPES: dict[str, tuple[str, ...]] = {
    "torch": tuple(TORCH_RECIPES),
    "torchao": ("tensorwise", "rowwise", "rowwise_with_gw_hp"),
    "transformer_engine": ("delayed", "current", "block", "mxfp8", "nvfp4"),
}
DEFAULT_RECIPE = {"torch": "tensorwise", "torchao": "tensorwise", "transformer_engine": "delayed"}
# TE's recipe classes, by our recipe name
TE_RECIPE_CLASS = {
    "delayed": "DelayedScaling",
    "current": "Float8CurrentScaling",
    "block": "Float8BlockScaling",
    "mxfp8": "MXFP8BlockScaling",
    "nvfp4": "NVFP4BlockScaling",
}


def multiple(backend: str, recipe: str) -> int:
    """Both dims of a Linear converted under this recipe are multiples of this."""
    if recipe == "block":
        return 128
    if recipe in ("mxfp8", "nvfp4"):
        return 32
    return 16



def requirement(
    backend: str, recipe: str, device: torch.device, capability: tuple[int, int] | None, cuda: str | None
) -> str | None:
    """What the device lacks for ``backend``/``recipe`` (None when it has everything).

    ``capability`` is the CUDA compute capability and ``cuda`` torch's CUDA version (both None off CUDA).
    """
    if device.type == "cpu":
        if backend == "transformer_engine":
            return "Transformer Engine needs a CUDA GPU (this run is on the CPU; backend='torch' emulates FP8 there)"
        return None  # torch: dequantized FP8 GEMMs; torchao: torch._scaled_mm's CPU kernel
    if device.type != "cuda":
        return f"FP8 needs a CUDA GPU or the CPU, not {device.type!r}"
    assert capability is not None
    cc = f"{capability[0]}.{capability[1]}"
    if capability < (8, 9):
        return f"FP8 needs compute capability >= 8.9 (Ada, Hopper, Blackwell); this GPU has {cc}"
    if backend == "transformer_engine":
        if recipe == "block":
            cuda_ok = cuda is not None and tuple(int(v) for v in cuda.split(".")[:2]) >= (12, 9)
            if capability < (9, 0) or not cuda_ok:
                return f"recipe='block' needs compute capability >= 9.0 and CUDA >= 12.9 (found {cc}, CUDA {cuda})"
        if recipe in ("mxfp8", "nvfp4") and capability < (10, 0):
            return f"recipe={recipe!r} needs compute capability >= 10.0 (Blackwell); this GPU has {cc}"
    return None


def import_torchao() -> Any:
    """``torchao.float8``, or ModuleNotFoundError naming the extra."""
    try:
        return importlib.import_module("torchao.float8")
    except ImportError as err:
        raise ModuleNotFoundError(
            f"FP8Precision(backend='torchao') needs torchao ({err}): pip install 'lightning-opt[torchao]'"
        ) from err


def import_te() -> tuple[Any, Any]:
    """``(transformer_engine.pytorch, transformer_engine.common.recipe)``; the real import is tried.

    The ``transformer-engine`` meta package installs without its PyTorch extension, so looking at the
    installed metadata is not enough.
    """
    try:
        te = importlib.import_module("transformer_engine.pytorch")
        recipe = importlib.import_module("transformer_engine.common.recipe")
    except Exception as err:  # noqa: BLE001 - a broken extension raises OSError/RuntimeError too
        raise ModuleNotFoundError(
            "FP8Precision(backend='transformer_engine') needs transformer-engine with its PyTorch extension "
            f"(`import transformer_engine.pytorch` failed: {err}): pip install 'lightning-opt[fp8]' on a CUDA machine"
        ) from err
    return te, recipe


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, leaf, new)


def convert_torch(
    root: nn.Module, names: list[str], *, recipe: str, matmul: str, amax_history_len: int, margin: int
) -> dict[str, FP8Linear]:
    done = {}
    for name in names:
        old = root.get_submodule(name)
        new = FP8Linear.from_linear(old, recipe=recipe, matmul=matmul, amax_history_len=amax_history_len, margin=margin)
        _set_child(root, name, new)
        done[name] = new
    return done


def convert_torchao(root: nn.Module, names: list[str], *, recipe: str, fsdp_float8_all_gather: bool) -> dict[str, nn.Module]:
    f8 = import_torchao()
    config = f8.Float8LinearConfig.from_recipe_name(recipe)
    if fsdp_float8_all_gather:
        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    chosen = set(names)
    f8.convert_to_float8_training(root, config=config, module_filter_fn=lambda _m, fqn: fqn in chosen)
    return {name: root.get_submodule(name) for name in names}


def te_recipe(recipe_mod: Any, recipe: str, *, amax_history_len: int, margin: int) -> Any:
    cls_name = TE_RECIPE_CLASS[recipe]
    cls = getattr(recipe_mod, cls_name, None)
    if cls is None:
        raise ModuleNotFoundError(
            f"FP8Precision(recipe={recipe!r}) needs transformer_engine.common.recipe.{cls_name}, which the installed "
            "transformer-engine lacks: upgrade it (pip install -U 'lightning-opt[fp8]')"
        )
    if recipe == "delayed":
        return cls(
            margin=margin,
            fp8_format=recipe_mod.Format.HYBRID,
            amax_history_len=amax_history_len,
            amax_compute_algo="max",
        )
    if recipe == "current":
        return cls(fp8_format=recipe_mod.Format.HYBRID)
    return cls()


def convert_te(te: Any, root: nn.Module, names: list[str], norms: list[str]) -> dict[str, nn.Module]:
    """``nn.Linear`` -> ``te.Linear`` and (``norms``) ``nn.LayerNorm`` -> ``te.LayerNorm``, weights copied."""
    done: dict[str, nn.Module] = {}
    for name in names:
        old = root.get_submodule(name)
        w = old.weight
        new = te.Linear(old.in_features, old.out_features, bias=old.bias is not None, params_dtype=w.dtype, device=w.device)
        with torch.no_grad():
            new.weight.copy_(w)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        _set_child(root, name, new)
        done[name] = new
    for name in norms:
        old = root.get_submodule(name)
        (hidden,) = old.normalized_shape
        dtype = old.weight.dtype if old.weight is not None else torch.get_default_dtype()
        device = old.weight.device if old.weight is not None else next(root.parameters()).device
        new = te.LayerNorm(hidden, eps=old.eps, params_dtype=dtype, device=device)
        with torch.no_grad():
            if old.elementwise_affine:
                new.weight.copy_(old.weight)
                if old.bias is not None:
                    new.bias.copy_(old.bias)
                else:
                    new.bias.zero_()
                    new.bias.requires_grad_(False)
            else:  # no affine: TE's LayerNorm always has one; hold it at identity and out of training
                new.weight.fill_(1.0)
                new.bias.zero_()
                new.weight.requires_grad_(False)
                new.bias.requires_grad_(False)
        _set_child(root, name, new)
        done[name] = new
    return done


@contextlib.contextmanager
def te_autocast(te: Any, recipe: Any, group: Any) -> Iterator[None]:
    """``te.autocast`` where TE has it (>= 2.8), else the older ``te.fp8_autocast``."""
    if hasattr(te, "autocast"):
        ctx = te.autocast(enabled=True, recipe=recipe, amax_reduction_group=group)
    else:
        ctx = te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=group)
    with ctx:
        yield
