"""Test-session setup.

Triton has no CPU driver; its interpreter runs the kernels on CPU tensors when TRITON_INTERPRET=1
is set before triton is imported, so ``impl="triton"`` is tested here (small sizes). The engine's
``impl="auto"`` never picks the interpreter (tests/test_impls.py checks it).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (README's test command runs `-n auto`) every worker keeps to one intra-op thread:
# several workers each spinning an OpenMP pool on a 2-core machine made single tests 20-80x slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
