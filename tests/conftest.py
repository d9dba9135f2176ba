"""Test-session setup.

Triton has no CPU driver; its interpreter runs the kernels on CPU tensors when TRITON_INTERPRET=1
is set before triton is imported, so ``impl="triton"`` is tested here (small sizes). The engine's
``impl="auto"`` never picks the interpreter (tests/test_impls.py checks it).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
