"""The reference implementations the tests compare against are installed (the ``test`` extra).

Reference tests use ``pytest.importorskip`` so that a partial install still runs the rest; this
test makes a missing oracle a failure rather than a silent skip.
"""

from __future__ import annotations

import importlib

import pytest

ORACLES = [
    "lion_pytorch",
    "schedulefree",
    "optimi",
    "pytorch_optimizer",
    "transformers",
    "bitsandbytes",
    "sophia_opt",
    "grokadamw",
    "apollo_torch",
    "lomo_optim",
    "matplotlib",
    "triton",  # impl="triton" runs in its interpreter
    "torchao",  # FP8Precision's torch backend is checked against its Float8Linear
    "accelerate",  # transformers.TrainingArguments (tests/test_hf.py)
    "mup",  # tests/oracles-nodeps.txt: μP lrs equal mup's
]


@pytest.mark.parametrize("module", ORACLES)
def test_oracle_is_installed(module: str) -> None:
    importlib.import_module(module)
