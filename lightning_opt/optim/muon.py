"""Muon: momentum orthogonalized by Newton-Schulz for 2-D hidden weights, AdamW for the rest.

Registered as ``muon`` (DeepSpeed's ``MuonOptimizer`` resolves to it). One :class:`Muon` object
steps both sides, so Lightning's automatic optimization sees a single optimizer.

The math lives in plain functions of tensors (:func:`zeropower_via_newtonschulz`,
:func:`muon_update_`, :func:`adamw_update_`) so a fused kernel or a sharded wrapper can call it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_opt.optim.base import (
    DEFAULT_ADAMW_PATTERNS,
    adamw_update_,
    check_arg,
    check_flag,
    compute_dtype,
    is_number,
    keep_state_dtype_on_load,
    reject_dtensor,
    reject_sparse_grad,
    run_closure,
)
from lightning_opt.optim.registry import OptimInfo, register, register_alias

__all__ = [
    "Muon",
    "adamw_update_",
    "adjusted_lr",
    "muon_update_",
    "zeropower_via_newtonschulz",
]

AdjustLR = Literal["original", "match_rms_adamw"]

#: Keller Jordan's quintic coefficients (maximal slope at zero), torch's defaults too
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

# Keller's aux-Adam lr (3e-4) over his Muon lr (0.02): the AdamW side's lr ratio for "original"
_ORIGINAL_ADAMW_RATIO = 3e-4 / 0.02
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64, "float16": torch.float16}


def zeropower_via_newtonschulz(
    G: Tensor,
    steps: int = 5,
    dtype: torch.dtype = torch.float32,
    *,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
) -> Tensor:
    """Approximately orthogonalize the matrix ``G`` (``U S V^T -> U S' V^T``, ``S'`` in ~[0.7, 1.2]).

    Quintic Newton-Schulz (Keller Jordan 2024): ``X = G / max(||G||_F, eps)`` (transposed so that
    ``X X^T`` is the smaller Gram matrix), then ``steps`` times ``A = X X^T``,
    ``X <- a X + (b A + c A^2) X``.

    Args:
        G: a 2-D tensor; not modified.
        steps: iterations (default 5).
        dtype: dtype the iteration runs in (float32 on CPU, bfloat16 on CUDA is Keller's choice).
        coefficients: ``(a, b, c)`` (default Keller's ``(3.4445, -4.7750, 2.0315)``).
        eps: lower bound of the Frobenius norm used for normalization (default ``1e-7``).

    Returns:
        A new tensor of ``G``'s shape in ``dtype``.

    Raises:
        ValueError: ``G`` is not 2-D.
    """
    if G.ndim != 2:
        raise ValueError(f"zeropower_via_newtonschulz needs a 2-D matrix, got shape {tuple(G.shape)}")
    a, b, c = coefficients
    X = G.to(dtype, copy=True)
    tall = G.size(0) > G.size(1)
    if tall:
        X = X.T
    X.div_(X.norm().clamp(min=eps))
    for _ in range(steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.addmm(X, B, X, beta=a)  # a X + B X
    return X.T if tall else X


def adjusted_lr(lr: float, shape: Sequence[int], adjust_lr_fn: AdjustLR) -> float:
    """The lr applied to the orthogonalized update of an ``A x B`` matrix.

    ``"original"`` (Keller): ``lr * sqrt(max(1, A / B))``. ``"match_rms_adamw"`` (Moonlight, Liu et al.
    2025): ``lr * 0.2 * sqrt(max(A, B))``, an update RMS of about 0.2 like AdamW's, so AdamW's lr and
    weight decay carry over.
    """
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    return lr * 0.2 * math.sqrt(max(rows, cols))


def muon_update_(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_steps: int,
    ns_coefficients: tuple[float, float, float],
    eps: float,
    ns_dtype: torch.dtype,
    adjust_lr_fn: AdjustLR,
) -> None:
    """One Muon step for one matrix (or conv weight, viewed as ``(out, -1)``), in place.

    ``B <- lerp(B, g, 1 - mu)``; ``U = lerp(g, B, mu)`` (Nesterov) or ``B``; ``O = NS(U)``;
    ``p <- p (1 - lr wd)``; ``p <- p - adjusted_lr(lr) O``. The decay uses the unadjusted lr, as in
    torch and Keller. The momentum and the arithmetic are float32 for bf16/fp16 parameters, which
    are rounded once per step (after both the decay and the update).
    """
    dt = compute_dtype(param)
    g = grad.to(dt).reshape(param.size(0), -1)
    buf = momentum_buffer.view(param.size(0), -1)
    buf.lerp_(g, 1 - momentum)
    update = g.lerp(buf, momentum) if nesterov else buf
    ortho = zeropower_via_newtonschulz(update, ns_steps, ns_dtype, coefficients=ns_coefficients, eps=eps)
    step = adjusted_lr(lr, buf.shape, adjust_lr_fn)
    # a bf16/fp16 parameter is decayed and updated in float32 and rounded once, not once per op
    p = param if param.dtype == dt else param.to(dt)
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    p.add_(ortho.reshape(param.shape), alpha=-step)
    if p is not param:
        param.copy_(p)


def _resolve_dtype(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        if value is not None and not value.is_floating_point:
            raise ValueError(f"Muon(ns_dtype={value!r}) is invalid; expected a floating dtype")
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"Muon(ns_dtype={value!r}) is invalid; expected None, a torch dtype or one of {sorted(_DTYPES)}")


class Muon(Optimizer):
    """Muon for 2-D hidden weights and AdamW for everything else, in one optimizer.

    Which side a parameter takes is decided once, when its group is added, and saved in the group
    (``muon_mask``), so a checkpoint resumes with the same split:

    1. a group key ``use_muon`` (``True``/``False``) decides for the whole group (``True`` on a
       parameter with fewer than 2 dims is an error);
    2. otherwise a parameter goes to Muon if it is 2-D (or, with ``flatten_conv=True``, has more
       than 2 dims) and its name (from the group's ``param_names``) matches none of
       ``adamw_patterns``. Without names only the shape decides, so pass named parameters
       (``build_optimizer`` does) or embeddings and the output head would get Muon.

    Conv weights (4-D) go to AdamW by default, as the issue asks; ``flatten_conv=True`` views them
    as ``(out_channels, -1)`` matrices as Keller's implementation does.

    How the two learning rates relate: the AdamW side uses ``group lr * adamw_lr_ratio``, so
    schedules and layer decay (which change the group lr) scale both sides together. With
    ``adjust_lr_fn="original"`` (Keller; Muon lr ~0.02) the ratio defaults to ``3e-4 / 0.02 =
    0.015`` (Keller's aux-Adam lr); with ``"match_rms_adamw"`` (Moonlight: the Muon update has an
    AdamW-like RMS of 0.2) it defaults to 1, i.e. one lr (and one weight decay) for both sides.

    Args:
        params: parameters, ``(name, tensor)`` pairs or param-group dicts (``param_names``,
            ``lr_scale``, ``use_muon`` and other extra keys are kept).
        lr: Muon learning rate (default ``0.02``, Keller's).
        weight_decay: decoupled weight decay for both sides, ``p *= 1 - lr_side * wd`` (default 0).
        momentum: Muon momentum ``mu`` in [0, 1) (default ``0.95``).
        nesterov: use the Nesterov form ``lerp(g, B, mu)`` (default ``True``).
        ns_steps: Newton-Schulz iterations (default 5).
        ns_coefficients: quintic coefficients ``(a, b, c)`` (default ``(3.4445, -4.7750, 2.0315)``).
        eps: lower bound of the Frobenius norm in Newton-Schulz (default ``1e-7``).
        ns_dtype: dtype of the Newton-Schulz iteration: ``None`` (default) means bfloat16 for CUDA
            tensors and float32 otherwise (float64 for float64 parameters); bf16 matmuls are ~100x
            slower than fp32 on CPU. A dtype or ``"float32"``/``"bfloat16"``/``"float64"``.
        adjust_lr_fn: ``"original"`` (default) or ``"match_rms_adamw"``, named as in
            ``torch.optim.Muon`` (``None`` means ``"original"``).
        adamw_lr: absolute AdamW-side lr; stored as the ratio ``adamw_lr / lr`` (default ``None``).
        adamw_lr_ratio: AdamW-side lr as a multiple of the group lr (default ``None``: see above).
        adamw_betas: AdamW betas (default ``(0.9, 0.95)``, Keller's and Moonlight's).
        adamw_eps: AdamW eps (default ``1e-10``, Keller's).
        adamw_patterns: name regexes of 2-D parameters sent to AdamW (default
            :data:`DEFAULT_ADAMW_PATTERNS`: embeddings and the output head).
        flatten_conv: give parameters with more than 2 dims to Muon as ``(dim0, -1)`` matrices
            instead of AdamW (default ``False``).

    Raises:
        ValueError: invalid lr, weight decay, momentum, betas, eps, ns_steps, coefficients,
            ns_dtype, adjust_lr_fn or pattern; both ``adamw_lr`` and ``adamw_lr_ratio``; ``use_muon=True``
            on a parameter with fewer than 2 dims (or more than 2 without ``flatten_conv``); a flag
            (``nesterov``, ``flatten_conv``, a group's ``use_muon``) that is not a bool.
        NotImplementedError: a DTensor (FSDP2-sharded) parameter on the Muon side.

    Example:
        >>> opt = Muon(model.named_parameters(), lr=0.02, weight_decay=0.01)
        >>> opt = build_optimizer(model, "muon", lr=1e-3, adjust_lr_fn="match_rms_adamw", weight_decay=0.1)

    The Muon side matches ``torch.optim.Muon`` (EMA momentum, the same ``adjust_lr_fn`` rules);
    the difference is that torch always runs Newton-Schulz in bfloat16, here ``ns_dtype`` chooses.
    The AdamW side matches ``torch.optim.AdamW``. Papers: Keller Jordan, "Muon: An optimizer for
    hidden layers in neural networks" (2024); Liu et al., "Muon is Scalable for LLM Training",
    arXiv:2502.16982.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        *,
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_dtype: torch.dtype | str | None = None,
        adjust_lr_fn: AdjustLR | None = "original",
        adamw_lr: float | None = None,
        adamw_lr_ratio: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-10,
        adamw_patterns: Sequence[str] = DEFAULT_ADAMW_PATTERNS,
        flatten_conv: bool = False,
    ) -> None:
        check_arg("Muon", "lr", lr, is_number(lr) and lr >= 0, "lr must be a finite number >= 0")
        check_arg(
            "Muon",
            "weight_decay",
            weight_decay,
            is_number(weight_decay) and weight_decay >= 0,
            "it must be a finite number >= 0",
        )
        check_arg("Muon", "momentum", momentum, is_number(momentum) and 0 <= momentum < 1, "it must lie in [0, 1)")
        check_arg(
            "Muon",
            "ns_steps",
            ns_steps,
            isinstance(ns_steps, int) and not isinstance(ns_steps, bool) and 0 < ns_steps < 100,
            "it must be an int in [1, 99]",
        )
        check_arg(
            "Muon",
            "ns_coefficients",
            ns_coefficients,
            isinstance(ns_coefficients, (tuple, list))
            and len(ns_coefficients) == 3
            and all(is_number(c) for c in ns_coefficients),
            "expected three finite floats (a, b, c)",
        )
        check_arg("Muon", "eps", eps, is_number(eps) and eps > 0, "it must be a finite number > 0")
        ns_dtype = _resolve_dtype(ns_dtype)
        adjust_lr_fn = "original" if adjust_lr_fn is None else adjust_lr_fn
        check_arg(
            "Muon",
            "adjust_lr_fn",
            adjust_lr_fn,
            adjust_lr_fn in get_args(AdjustLR),
            f"expected one of {get_args(AdjustLR)}",
        )
        if adamw_lr is not None and adamw_lr_ratio is not None:
            raise ValueError(
                "Muon(adamw_lr=..., adamw_lr_ratio=...) are exclusive; give one (adamw_lr is stored as adamw_lr / lr)"
            )
        if adamw_lr is not None:
            check_arg(
                "Muon", "adamw_lr", adamw_lr, is_number(adamw_lr) and adamw_lr >= 0, "it must be a finite number >= 0"
            )
            check_arg(
                "Muon",
                "lr",
                lr,
                lr > 0,
                "adamw_lr is stored as adamw_lr / lr, so lr must be > 0 (or pass adamw_lr_ratio)",
            )
            adamw_lr_ratio = adamw_lr / lr
        elif adamw_lr_ratio is None:
            adamw_lr_ratio = _ORIGINAL_ADAMW_RATIO if adjust_lr_fn == "original" else 1.0
        check_arg(
            "Muon",
            "adamw_lr_ratio",
            adamw_lr_ratio,
            is_number(adamw_lr_ratio) and adamw_lr_ratio >= 0,
            "it must be a finite number >= 0",
        )
        check_arg(
            "Muon",
            "adamw_betas",
            adamw_betas,
            isinstance(adamw_betas, (tuple, list))
            and len(adamw_betas) == 2
            and all(is_number(b) and 0 <= b < 1 for b in adamw_betas),
            "expected two floats in [0, 1)",
        )
        check_arg(
            "Muon", "adamw_eps", adamw_eps, is_number(adamw_eps) and adamw_eps >= 0, "it must be a finite number >= 0"
        )
        if isinstance(adamw_patterns, str):
            raise ValueError(
                f"Muon(adamw_patterns={adamw_patterns!r}) is invalid; pass a list of regexes, e.g. [{adamw_patterns!r}]"
            )
        for pattern in adamw_patterns:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as err:
                raise ValueError(f"Muon(adamw_patterns=[..., {pattern!r}]) is invalid: {err}") from err
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": check_flag("Muon", "nesterov", nesterov),
            "ns_steps": ns_steps,
            "ns_coefficients": tuple(float(c) for c in ns_coefficients),
            "eps": eps,
            "ns_dtype": ns_dtype,
            "adjust_lr_fn": adjust_lr_fn,
            "adamw_lr_ratio": float(adamw_lr_ratio),
            "adamw_betas": tuple(float(b) for b in adamw_betas),
            "adamw_eps": adamw_eps,
            "adamw_patterns": tuple(adamw_patterns),
            "flatten_conv": check_flag("Muon", "flatten_conv", flatten_conv),
        }
        super().__init__(params, defaults)
        keep_state_dtype_on_load(self)
        self.register_load_state_dict_post_hook(Muon._backfill_masks)

    def _muon_mask(self, group: dict[str, Any]) -> list[bool]:
        params = group["params"]
        names = group.get("param_names")
        use_muon = group.get("use_muon")
        if use_muon is not None:
            check_flag("Muon", "use_muon", use_muon)
        patterns = [re.compile(p) for p in group["adamw_patterns"]]
        mask = []
        for i, p in enumerate(params):
            name = names[i] if names is not None and i < len(names) else None
            if use_muon is not None:
                if use_muon and (p.ndim < 2 or (p.ndim > 2 and not group["flatten_conv"])):
                    hint = "set flatten_conv=True" if p.ndim > 2 else "only matrices can be orthogonalized"
                    raise ValueError(
                        f"Muon: param group has use_muon=True but {name or f'parameter {i}'} has shape {tuple(p.shape)}; {hint}"
                    )
                on_muon = use_muon
            else:
                matrix = p.ndim == 2 or (p.ndim > 2 and group["flatten_conv"])
                on_muon = matrix and not (name is not None and any(pat.search(name) for pat in patterns))
            if on_muon:
                reject_dtensor("Muon", p, name)
            mask.append(on_muon)
        return mask

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its Muon/AdamW split is decided here and stored as ``group["muon_mask"]``."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["muon_mask"] = self._muon_mask(group)

    @staticmethod
    def _backfill_masks(opt: Optimizer) -> None:
        # a checkpoint saved without the split (none so far) gets it recomputed from the groups
        for group in opt.param_groups:
            if "muon_mask" not in group:
                group["muon_mask"] = opt._muon_mask(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; ``closure`` (re-evaluating the loss) is called once, with grad enabled."""
        loss = run_closure(closure)
        for group in self.param_groups:
            beta1, beta2 = group["adamw_betas"]
            for p, on_muon in zip(group["params"], group["muon_mask"]):
                if p.grad is None:
                    continue
                reject_sparse_grad(p, "Muon")
                state = self.state[p]
                dt = compute_dtype(p)
                if on_muon:
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p, dtype=dt, memory_format=torch.contiguous_format)
                    ns_dtype = group["ns_dtype"]
                    if ns_dtype is None:
                        ns_dtype = torch.bfloat16 if p.device.type == "cuda" else torch.promote_types(dt, torch.float32)
                    muon_update_(
                        p,
                        p.grad,
                        state["momentum_buffer"],
                        lr=group["lr"],
                        weight_decay=group["weight_decay"],
                        momentum=group["momentum"],
                        nesterov=group["nesterov"],
                        ns_steps=group["ns_steps"],
                        ns_coefficients=group["ns_coefficients"],
                        eps=group["eps"],
                        ns_dtype=ns_dtype,
                        adjust_lr_fn=group["adjust_lr_fn"],
                    )
                else:
                    if "exp_avg" not in state:
                        state["step"] = 0
                        state["exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
                    state["step"] += 1
                    adamw_update_(
                        p,
                        p.grad,
                        state["exp_avg"],
                        state["exp_avg_sq"],
                        state["step"],
                        lr=group["lr"] * group["adamw_lr_ratio"],
                        beta1=beta1,
                        beta2=beta2,
                        eps=group["adamw_eps"],
                        weight_decay=group["weight_decay"],
                    )
        return loss


register(
    OptimInfo(
        name="muon",
        cls=Muon,
        description="Muon (Newton-Schulz-orthogonalized momentum) on 2-D hidden weights, AdamW on the rest",
        paper="Keller Jordan 2024 (kellerjordan.github.io/posts/muon); Liu et al., arXiv:2502.16982",
        default_lr=0.02,
    )
)
register_alias("MuonOptimizer", "muon", source="deepspeed")
