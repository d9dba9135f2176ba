"""FP8 linear layers on plain torch: scaling recipes, saturating casts, the three GEMMs of a Linear.

Used by :class:`~lightning_opt.plugins.fp8.FP8Precision` with ``backend="torch"``; importable on its own
(``FP8Linear.from_linear(layer, recipe="tensorwise")``).

Every GEMM ``C[m, n] = A[m, k] @ B[k, n]`` of a Linear ``y = x W^T + b`` (forward ``y = x W^T``,
input gradient ``dx = g W``, weight gradient ``dW = g^T x``) quantizes its two operands to FP8 with
scales taken along the contraction dimension ``k`` at the granularity of the recipe, then multiplies:

=============  ===================================================  ==========================
recipe         scales (one fp32 scale per ...)                      forward / gradient format
=============  ===================================================  ==========================
``tensorwise`` tensor, from its current amax (current scaling)      e4m3 / e5m2
``delayed``    tensor, from the max of an amax history of previous  e4m3 / e5m2
               steps (Micikevicius et al. 2022, arXiv:2209.05433)
``rowwise``    row of each operand along ``k``                      e4m3 / e5m2
``block``      1x128 tile of activations and gradients along ``k``, e4m3 / e5m2
               128x128 block of the weight (DeepSeek-V3,
               arXiv:2412.19437)
``mxfp8``      32 elements along ``k``, power-of-two (E8M0) scales  e4m3 / e5m2
               (OCP Microscaling v1.0)
=============  ===================================================  ==========================

A scale maps the block's amax to the format's largest finite value (448 for e4m3, 57344 for e5m2);
values past it (possible with delayed scaling) saturate to +-max instead of becoming NaN/inf. MX
scales are ``2 ** ceil(log2(amax / max))`` (the rounding Transformer Engine and cuBLAS use, so no
element of a block saturates; the OCP spec's floor rule may clip the block's largest values).

The product runs as ``torch._scaled_mm`` (``matmul="scaled_mm"``: per-tensor or row scales, the FP8
tensor cores of compute capability >= 8.9; torch's CPU build has it too, which the tests use) or as
an fp32 matmul of the dequantized operands (``matmul="dequantized"``: any device; FP8 x FP8 products
are exact in fp32, so it differs from the FP8 GEMM only in accumulation order). ``block`` and
``mxfp8`` always take the dequantized path here: their numerics are exact, the speed is not that of
block-scaled tensor cores (use ``backend="transformer_engine"`` for those).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FP8Linear",
    "RECIPES",
    "DelayedState",
    "TorchRecipe",
    "dequantize",
    "fp8_linear",
    "quantize",
]

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
_EPS = 1e-12
# a block shape (rows, cols); 0 means "the whole dimension"
Block = tuple[int, int]
Matmul = Literal["scaled_mm", "dequantized"]


@dataclass(frozen=True)
class TorchRecipe:
    """How one recipe quantizes the operands of the three GEMMs (blocks given in each GEMM's ``A[m,k] @ B[k,n]``).

    ``a`` is the block shape of the left operand (activation ``x`` forward, gradient ``g`` for both
    backward GEMMs), ``w_fwd``/``w_dgrad`` the weight's in the forward (``B = W^T``) and input-gradient
    (``B = W``) GEMMs, ``b_wgrad`` the right operand of the weight-gradient GEMM (``B = x``).
    """

    name: str
    a: Block
    w_fwd: Block
    w_dgrad: Block
    b_wgrad: Block
    pow2: bool
    multiple: int  # both dims of an eligible Linear are multiples of this
    scaled_mm: bool  # torch._scaled_mm takes these scales
    delayed: bool = False


RECIPES: dict[str, TorchRecipe] = {
    r.name: r
    for r in (
        TorchRecipe("tensorwise", (0, 0), (0, 0), (0, 0), (0, 0), pow2=False, multiple=16, scaled_mm=True),
        TorchRecipe("delayed", (0, 0), (0, 0), (0, 0), (0, 0), pow2=False, multiple=16, scaled_mm=True, delayed=True),
        TorchRecipe("rowwise", (1, 0), (0, 1), (0, 1), (0, 1), pow2=False, multiple=16, scaled_mm=True),
        TorchRecipe("block", (1, 128), (128, 128), (128, 128), (128, 1), pow2=False, multiple=128, scaled_mm=False),
        TorchRecipe("mxfp8", (1, 32), (32, 1), (32, 1), (32, 1), pow2=True, multiple=32, scaled_mm=False),
    )
}


def _fmax(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def _as_blocks(t: torch.Tensor, block: Block) -> tuple[torch.Tensor, tuple[int, int]]:
    rows, cols = t.shape
    br = rows if block[0] == 0 else block[0]
    bc = cols if block[1] == 0 else block[1]
    pr, pc = (-rows) % br, (-cols) % bc
    if pr or pc:  # ragged edge: zero padding never raises an amax
        t = F.pad(t, (0, pc, 0, pr))
    return t.reshape((rows + pr) // br, br, (cols + pc) // bc, bc), (br, bc)


def scale_from_amax(amax: torch.Tensor, dtype: torch.dtype, *, pow2: bool = False) -> torch.Tensor:
    """The fp32 scale that maps ``amax`` to the format's largest value (a power of two when ``pow2``)."""
    amax = amax.float()
    if pow2:
        exp = torch.ceil(torch.log2(amax / _fmax(dtype))).clamp(-127, 127)  # E8M0 range
        return torch.exp2(-exp)
    return _fmax(dtype) / amax.clamp(min=_EPS)


def quantize(
    t: torch.Tensor,
    dtype: torch.dtype,
    block: Block,
    *,
    pow2: bool = False,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D tensor to ``dtype`` with one scale per ``block``; saturating.

    Args:
        t: the tensor, any float dtype.
        dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        block: (rows, cols) of a block; 0 spans the whole dimension ((0, 0): one scale per tensor).
        pow2: power-of-two (E8M0) scales.
        scale: a given per-tensor scale (delayed scaling) instead of one from the current amax.

    Returns:
        ``(q, scale_inv)``: ``q`` in ``dtype`` with ``t``'s shape and ``scale_inv`` float32 of shape
        ``(blocks along rows, blocks along cols)``, so that ``t ~= dequantize(q, scale_inv, block)``.
    """
    rows, cols = t.shape
    tb, _ = _as_blocks(t.float(), block)
    if scale is None:
        scale = scale_from_amax(tb.abs().amax(dim=(1, 3)), dtype, pow2=pow2)
    else:
        scale = scale.float().reshape(1, 1)
    m = _fmax(dtype)
    q = (tb * scale[:, None, :, None]).clamp_(-m, m).to(dtype)
    q = q.reshape(tb.shape[0] * tb.shape[1], tb.shape[2] * tb.shape[3])[:rows, :cols]
    return q, scale.reciprocal()


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: Block) -> torch.Tensor:
    """fp32 values of a tensor quantized by :func:`quantize`."""
    rows, cols = q.shape
    br = rows if block[0] == 0 else block[0]
    bc = cols if block[1] == 0 else block[1]
    s = scale_inv.repeat_interleave(br, dim=0).repeat_interleave(bc, dim=1)[:rows, :cols]
    return q.float() * s


def _gemm(
    a: torch.Tensor,
    a_block: Block,
    a_dtype: torch.dtype,
    b: torch.Tensor,
    b_block: Block,
    b_dtype: torch.dtype,
    *,
    pow2: bool,
    matmul: Matmul,
    out_dtype: torch.dtype,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``a @ b`` with both operands quantized along the contraction dimension."""
    qa, sa = quantize(a, a_dtype, a_block, pow2=pow2, scale=a_scale)
    qb, sb = quantize(b, b_dtype, b_block, pow2=pow2, scale=b_scale)
    # _scaled_mm needs k and n multiples of 16 (m too for the weight-gradient GEMM, whose k is tokens)
    rowwise = sa.numel() > 1 or sb.numel() > 1
    kind = (a.device.type, rowwise, a_dtype, b_dtype)
    if matmul == "scaled_mm" and a.shape[1] % 16 == 0 and b.shape[1] % 16 == 0 and kind not in _REFUSED:
        # row scales: the FP8 GEMM writes bf16 only; per-tensor scales: any output dtype
        mm_dtype = torch.bfloat16 if rowwise else out_dtype
        try:
            out = torch._scaled_mm(
                qa.contiguous(),
                qb.t().contiguous().t(),  # column-major right operand
                scale_a=sa.contiguous() if rowwise else sa.reshape(()),
                scale_b=sb.contiguous() if rowwise else sb.reshape(()),
                out_dtype=mm_dtype,
            )
            return out.to(out_dtype)
        except RuntimeError as err:  # a kernel this torch/GPU lacks (e.g. row scales with an e5m2 operand)
            _REFUSED.add(kind)
            warnings.warn(
                f"torch._scaled_mm refused {a_dtype} x {b_dtype} with {'row' if rowwise else 'tensor'} scales on "
                f"{a.device.type} ({str(err).splitlines()[0]}); those GEMMs run dequantized from now on",
                stacklevel=2,
            )
    return (dequantize(qa, sa, a_block) @ dequantize(qb, sb, b_block)).to(out_dtype)


# (device type, row scales, dtype of a, dtype of b) that torch._scaled_mm refused in this process
_REFUSED: set[tuple[str, bool, torch.dtype, torch.dtype]] = set()


class DelayedState:
    """Amax history and scales of one FP8 layer under delayed scaling (rows: input, weight, gradient).

    ``amax_history[:, 0]`` collects the current step's amax (the max over micro-batches);
    :meth:`update` (after each optimizer step) turns the history into the next step's scales and
    rolls it. Until the first update the layer scales from the current amax (no history yet).
    """

    FORMATS = (E4M3, E4M3, E5M2)

    def __init__(self, history_len: int, margin: int, device: torch.device | str = "cpu") -> None:
        self.history_len = history_len
        self.margin = margin
        self.amax_history = torch.zeros(3, history_len, dtype=torch.float32, device=device)
        self.scale = torch.ones(3, dtype=torch.float32, device=device)
        self.ready = False

    def to(self, device: torch.device) -> DelayedState:
        self.amax_history = self.amax_history.to(device)
        self.scale = self.scale.to(device)
        return self

    @torch.no_grad()
    def record(self, row: int, t: torch.Tensor) -> None:
        cur = self.amax_history[row, 0]
        cur.copy_(torch.maximum(cur, t.detach().abs().amax().float()))

    @torch.no_grad()
    def update(self) -> None:
        """New scales from the history's max (kept where it is 0 or non-finite), then roll the history."""
        fmax = torch.tensor([_fmax(d) for d in self.FORMATS], device=self.scale.device)
        amax = self.amax_history.amax(dim=1)
        new = fmax / amax.clamp(min=_EPS) / 2.0**self.margin
        self.scale.copy_(torch.where((amax > 0) & torch.isfinite(amax), new, self.scale))
        self.amax_history.copy_(torch.roll(self.amax_history, 1, dims=1))
        self.amax_history[:, 0] = 0.0
        self.ready = True

    def state_dict(self) -> dict[str, object]:
        return {"amax_history": self.amax_history.clone(), "scale": self.scale.clone(), "ready": self.ready}

    def load_state_dict(self, state: dict[str, object]) -> None:
        hist = state["amax_history"]
        assert isinstance(hist, torch.Tensor)
        if hist.shape != self.amax_history.shape:
            raise ValueError(
                f"amax history of shape {tuple(hist.shape)} does not fit amax_history_len={self.history_len}"
            )
        self.amax_history.copy_(hist)
        self.scale.copy_(state["scale"])  # type: ignore[arg-type]
        self.ready = bool(state["ready"])


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        recipe: TorchRecipe,
        matmul: Matmul,
        out_dtype: torch.dtype,
        state: DelayedState | None,
        record: bool,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        sx = sw = None
        if state is not None:
            if record:
                state.record(0, x2)
                state.record(1, weight)
            if state.ready:
                sx, sw = state.scale[0].clone(), state.scale[1].clone()
        mm = matmul if recipe.scaled_mm else "dequantized"
        with torch.autocast(x.device.type, enabled=False):
            y = _gemm(
                x2, recipe.a, E4M3, weight.t(), recipe.w_fwd, E4M3,
                pow2=recipe.pow2, matmul=mm, out_dtype=out_dtype, a_scale=sx, b_scale=sw,
            )
            if bias is not None:
                y = y + bias.to(out_dtype)
        ctx.save_for_backward(x2, weight)
        ctx.recipe, ctx.matmul, ctx.state, ctx.record = recipe, mm, state, record
        ctx.x_shape, ctx.x_dtype, ctx.has_bias = x.shape, x.dtype, bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.scales = (sx, sw, state.scale[2].clone() if state is not None and state.ready else None)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, gy: torch.Tensor):  # type: ignore[override]
        x2, weight = ctx.saved_tensors
        r: TorchRecipe = ctx.recipe
        g = gy.reshape(-1, gy.shape[-1])
        if ctx.state is not None and ctx.record:
            ctx.state.record(2, g)
        sx, sw, sg = ctx.scales
        dx = dw = db = None
        with torch.autocast(g.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                dx = _gemm(
                    g, r.a, E5M2, weight, r.w_dgrad, E4M3,
                    pow2=r.pow2, matmul=ctx.matmul, out_dtype=ctx.x_dtype, a_scale=sg, b_scale=sw,
                ).reshape(ctx.x_shape)
            if ctx.needs_input_grad[1]:
                dw = _gemm(
                    g.t(), r.a, E5M2, x2, r.b_wgrad, E4M3,
                    pow2=r.pow2, matmul=ctx.matmul, out_dtype=weight.dtype, a_scale=sg, b_scale=sx,
                )
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = g.float().sum(0).to(ctx.bias_dtype)  # in high precision, as TE and torchao
        return dx, dw, db, None, None, None, None, None


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    recipe: str | TorchRecipe = "tensorwise",
    matmul: Matmul = "dequantized",
    state: DelayedState | None = None,
    record: bool = True,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with FP8 GEMMs forward and backward (see the module docstring).

    The output dtype is the autocast dtype under ``torch.autocast``, else ``x``'s; the gradients are
    in the dtypes of ``x``, ``weight`` and ``bias``. ``state`` (required for ``recipe="delayed"``)
    supplies the scales and records the amaxes when ``record``.
    """
    r = RECIPES[recipe] if isinstance(recipe, str) else recipe
    if r.delayed and state is None:
        raise ValueError("fp8_linear(recipe='delayed') needs a DelayedState")
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    return _FP8LinearFn.apply(x, weight, bias, r, matmul, out_dtype, state if r.delayed else None, record)


class FP8Linear(nn.Linear):
    """An ``nn.Linear`` whose three GEMMs run in FP8 (same parameters and state_dict keys as nn.Linear).

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        recipe: ``tensorwise``, ``delayed``, ``rowwise``, ``block`` or ``mxfp8`` (module docstring).
        matmul: ``"scaled_mm"`` (FP8 tensor cores; per-tensor and row scales) or ``"dequantized"``.
        amax_history_len, margin: delayed scaling's window (steps) and ``2**-margin`` headroom.

    The delayed-scaling state is not a buffer, so it stays out of the module's state_dict (a model
    without FP8 loads the same checkpoint) and out of DDP's buffer broadcast; ``FP8Precision`` saves
    it in its own checkpoint entry.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        recipe: str = "tensorwise",
        matmul: Matmul = "dequantized",
        amax_history_len: int = 16,
        margin: int = 0,
    ) -> None:
        if recipe not in RECIPES:
            raise ValueError(f"FP8Linear(recipe={recipe!r}) is invalid; expected one of {tuple(RECIPES)}")
        if matmul not in ("scaled_mm", "dequantized"):
            raise ValueError(f"FP8Linear(matmul={matmul!r}) is invalid; expected 'scaled_mm' or 'dequantized'")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.recipe = recipe
        self.matmul: Matmul = matmul
        self.amax_history_len, self.margin = amax_history_len, margin
        self.fp8_state: DelayedState | None = None
        if RECIPES[recipe].delayed:
            device = self.weight.device if self.weight.device.type != "meta" else "cpu"
            self.fp8_state = DelayedState(amax_history_len, margin, device=device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: object) -> FP8Linear:
        """An FP8Linear sharing ``linear``'s parameters (same device, dtype and bias)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta", **kwargs)  # type: ignore[arg-type]
        new.weight = linear.weight
        new.bias = linear.bias
        if new.fp8_state is not None:
            new.fp8_state = DelayedState(new.amax_history_len, new.margin, device=linear.weight.device)
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.fp8_state
        if state is not None and state.scale.device != self.weight.device:
            state.to(self.weight.device)
        record = self.training and torch.is_grad_enabled()
        return fp8_linear(x, self.weight, self.bias, recipe=self.recipe, matmul=self.matmul, state=state, record=record)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe}, matmul={self.matmul}"


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|ref|^2 / |ref - approx|^2)`` in dB."""
    ref64, err = ref.double(), ref.double() - approx.double()
    return 10.0 * math.log10(ref64.pow(2).sum().item() / max(err.pow(2).sum().item(), 1e-300))
