"""Device functions every Triton kernel shares (the Triton side of ``csrc/common.h``).

Imports triton: only the kernel modules import this, after ``triton_launcher.require``.

- Storage kinds (the ``PK``/``SK`` constexprs): 0 float32, 1 float64, 2 bfloat16, 3 float16.
  Arithmetic runs in float64 for float64 tensors, in float32 otherwise (:func:`hp` rounds a float64
  hyperparameter to it).
- bfloat16 is loaded and stored as its 16 bits, converted with integer operations: round to nearest
  even (NaN kept quiet), or stochastically with the counter-based hash of
  ``lightning_opt.optim.precision.sr_bits`` (Wellons' lowbias32 of the element index plus the
  tensor's seed key, xor the float32 bits, hashed again; 16 bits added below the kept ones, then
  truncated; inf/NaN to nearest).
- Stochastic-rounding seeds: a kernel with the ``SR`` switch takes a ``SEEDS`` table (int64, one
  entry per tensor of the launch: ``precision.sr_key`` of the tensor's step count, built by
  ``triton_launcher.seed_table``), a runtime argument, so a new step never recompiles; without
  ``SR`` the table is a placeholder that is never read.
  Triton's interpreter truncates float32 -> bfloat16 casts and writes garbage for a float32 stored
  into a bfloat16 pointer, so no kernel relies on either: interpreter and GPU agree bit for bit.
- Kahan: :func:`update` follows ``precision.kahan_add_`` (``c += d; old = p; p += c; c += old - p``,
  each result rounded to the parameter's dtype).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "address",
    "block_of",
    "device",
    "div",
    "first_block",
    "hp",
    "load",
    "round_to",
    "segment_sums",
    "sqrt",
    "store",
    "store_param",
    "update",
]


def device(fn):
    """``triton.jit`` for device functions; in the interpreter, a plain call of the rewritten function.

    The interpreter re-patches ``triton.language`` at every device-function call (about 2 ms, more
    than the arithmetic); the kernel's launch has patched it already, so the rewritten function is
    called directly. Compiled (GPU) kernels are unaffected.
    """
    jitted = triton.jit(fn)
    rewrite = getattr(jitted, "rewrite", None)
    if not triton.knobs.runtime.interpret or rewrite is None:
        return jitted
    rewritten = []

    def call(*args, **kwargs):
        if not rewritten:
            rewritten.append(rewrite())
        return rewritten[0](*args, **kwargs)

    call.__name__ = fn.__name__
    call.__doc__ = fn.__doc__
    return call


@device
def block_of(SIZES, BLOCKS, BLOCK: tl.constexpr):
    """This program's tensor ``t``, its element offsets and the mask of those inside the tensor."""
    pid = tl.program_id(0)
    t = tl.load(BLOCKS + 2 * pid)
    start = tl.load(BLOCKS + 2 * pid + 1)
    numel = tl.load(SIZES + t)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    return t, offs, offs < numel


@device
def address(PTRS, t, l, L: tl.constexpr):
    """The data pointer (int64) of tensor ``t`` of list ``l`` (0 where the entry is absent)."""
    return tl.load(PTRS + t * L + l)


@device
def hp(x, KIND: tl.constexpr):
    """A float64 hyperparameter in the compute dtype of ``KIND`` storage (rounded to float32 unless float64)."""
    if KIND == 1:
        y = x
    else:
        y = tl.cast(x, tl.float32)
    return y


if triton.knobs.runtime.interpret:
    _hp_compiled = hp

    def hp(x, KIND):  # noqa: F811 - the interpreter's version
        # the interpreter passes float arguments as Python floats, and Triton types a Python float as
        # float32 (a float64 kernel would see it rounded): make the constant in the compute dtype
        if isinstance(x, float):
            return tl.full((), x, tl.float64 if KIND == 1 else tl.float32)
        return _hp_compiled(x, KIND)


@device
def div(a, b, KIND: tl.constexpr):
    """``a / b`` correctly rounded (as torch's division; Triton's float32 ``/`` is approximate on GPUs)."""
    if KIND == 1:
        y = a / b
    else:
        y = tl.div_rn(a, b)
    return y


@device
def sqrt(x, KIND: tl.constexpr):
    """``sqrt(x)`` correctly rounded (as torch's; Triton's float32 ``tl.sqrt`` is approximate on GPUs)."""
    if KIND == 1:
        y = tl.sqrt(x)
    else:
        y = tl.sqrt_rn(x)
    return y


@device
def load(raw, offs, mask, KIND: tl.constexpr):
    """Elements ``offs`` of the tensor at address ``raw`` in the compute dtype (0 outside ``mask``)."""
    if KIND == 2:
        bits = tl.load(raw.to(tl.pointer_type(tl.uint16)) + offs, mask=mask, other=0)
        x = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif KIND == 3:
        x = tl.load(raw.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=0).to(tl.float32)
    elif KIND == 1:
        x = tl.load(raw.to(tl.pointer_type(tl.float64)) + offs, mask=mask, other=0)
    else:
        x = tl.load(raw.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0)
    return x


@device
def bf16_nearest(v):
    """float32 ``v`` -> bfloat16 bits (uint32), rounded to nearest even; NaN stays a quiet NaN."""
    u = v.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return tl.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x40, r)


@device
def hash32(x):
    """Wellons' lowbias32 (uint32), as ``precision._hash32`` and ``csrc/common.h``."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@device
def bf16_stochastic(v, offs, key):
    """float32 ``v`` -> bfloat16 bits (uint32), stochastically rounded (``precision.stochastic_round``
    with the seed whose ``precision.sr_key`` is ``key``, a uint32)."""
    u = v.to(tl.uint32, bitcast=True)
    r = hash32(hash32(offs.to(tl.uint32) + key) ^ u) & 0xFFFF
    return tl.where((u & 0x7F800000) == 0x7F800000, bf16_nearest(v), (u + r) >> 16)


@device
def round_to(v, KIND: tl.constexpr):
    """``v`` rounded to the storage dtype of ``KIND`` (nearest even), back in the compute dtype."""
    if KIND == 2:
        y = (bf16_nearest(v) << 16).to(tl.float32, bitcast=True)
    elif KIND == 3:
        y = v.to(tl.float16).to(tl.float32)
    else:
        y = v
    return y


@device
def store(raw, offs, v, mask, KIND: tl.constexpr):
    """Store compute-dtype ``v`` into the tensor at ``raw``, rounded to nearest even."""
    if KIND == 2:
        tl.store(raw.to(tl.pointer_type(tl.uint16)) + offs, bf16_nearest(v).to(tl.uint16), mask=mask)
    elif KIND == 3:
        tl.store(raw.to(tl.pointer_type(tl.float16)) + offs, v.to(tl.float16), mask=mask)
    elif KIND == 1:
        tl.store(raw.to(tl.pointer_type(tl.float64)) + offs, v, mask=mask)
    else:
        tl.store(raw.to(tl.pointer_type(tl.float32)) + offs, v, mask=mask)


@device
def store_param(raw, offs, v, mask, KIND: tl.constexpr, SR: tl.constexpr, SEEDS, t):
    """Store compute-dtype ``v`` into tensor ``t`` at ``raw``: with ``SR`` a bfloat16 tensor is rounded
    stochastically with its seed key ``SEEDS[t]`` (``precision.store_``), otherwise to nearest."""
    if KIND == 2 and SR:
        bits = bf16_stochastic(v, offs, tl.load(SEEDS + t).to(tl.uint32))
        tl.store(raw.to(tl.pointer_type(tl.uint16)) + offs, bits.to(tl.uint16), mask=mask)
    else:
        store(raw, offs, v, mask, KIND)


@device
def update(P, C, offs, mask, p, d, KIND: tl.constexpr, KAHAN: tl.constexpr, SR: tl.constexpr, SEEDS, t):
    """Store ``p + d`` into parameter ``t`` at ``P`` (``p`` loaded, possibly decayed, in the compute dtype).

    With ``KAHAN`` the compensation buffer at ``C`` (the parameter's dtype) takes part as in
    ``precision.kahan_add_``; with ``SR`` a bfloat16 result is rounded stochastically with the seed
    key ``SEEDS[t]``; otherwise to nearest (``precision.apply_update_``).
    """
    if KAHAN:
        c1 = round_to(load(C, offs, mask, KIND) + d, KIND)
        p1 = round_to(p + c1, KIND)
        back = round_to(p - p1, KIND)
        store(P, offs, p1, mask, KIND)
        store(C, offs, c1 + back, mask, KIND)
    else:
        store_param(P, offs, p + d, mask, KIND, SR, SEEDS, t)


@device
def first_block(BLOCKS):
    """Whether this program holds its tensor's first block (the one that writes per-tensor results)."""
    return tl.load(BLOCKS + 2 * tl.program_id(0) + 1) == 0


@triton.jit
def segment_sums(FIRST, PART, SUMS, K: tl.constexpr, RBLOCK: tl.constexpr):
    """Program ``t``: ``SUMS[t K + j] = sum of PART[b K + j]`` over its blocks ``FIRST[t] .. FIRST[t+1]``.

    The partials are added in block order in fixed chunks (float64): the same result every run,
    whatever the GPU's scheduling (no atomics).
    """
    t = tl.program_id(0)
    lo = tl.load(FIRST + t)
    hi = tl.load(FIRST + t + 1)
    for j in tl.static_range(K):
        acc = tl.zeros((RBLOCK,), dtype=tl.float64)
        for b in range(lo, hi, RBLOCK):
            idx = b + tl.arange(0, RBLOCK)
            acc += tl.load(PART + idx * K + j, mask=idx < hi, other=0.0)
        tl.store(SUMS + t * K + j, tl.sum(acc, axis=0))
