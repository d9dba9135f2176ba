"""Kernels behind the optimizer engine's fast implementations; imported lazily, never at package import.

- :mod:`lightning_opt.kernels.cpu`: the fused CPU kernels (C sources in ``csrc/``, one file per
  algorithm family, sharing ``csrc/common.h``), built once per machine with the system C compiler and
  called through one multi-tensor launcher: one call per (dtype) bucket over all its tensors.
- :mod:`lightning_opt.kernels.triton_launcher` and ``triton_<family>.py``: the Triton kernels and
  their shared multi-tensor launcher (CUDA; the CPU only under ``TRITON_INTERPRET=1``).

The family files in :mod:`lightning_opt.optim` keep the math; every kernel equals the family's
``for_loop`` implementation (tests/kernels).
"""
