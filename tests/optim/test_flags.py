"""Boolean options accept only True or False: the string "false" (a quoted YAML value) is an error."""

from __future__ import annotations

import pytest
import torch

from lightning_opt import build_optimizer
from lightning_opt.optim.base import check_flag

FLAGS = [
    ("lamb", "bias_correction"),
    ("lamb", "grad_averaging"),
    ("lamb", "trust_clip"),
    ("lamb", "always_adapt"),
    ("lamb", "kahan_sum"),
    ("lars", "nesterov"),
    ("lars", "trust_clip"),
    ("lars", "always_adapt"),
    ("lars", "kahan_sum"),
    ("lion", "kahan_sum"),
    ("grokadamw", "kahan_sum"),
    ("stable_adamw", "decouple_lr"),
    ("stable_adamw", "kahan_sum"),
    ("muon", "nesterov"),
    ("muon", "flatten_conv"),
    ("soap", "merge_dims"),
    ("soap", "precondition_1d"),
    ("soap", "normalize_grads"),
    ("soap", "correct_bias"),
    ("apollo", "scale_front"),
    ("apollo_mini", "scale_front"),
    ("sophia", "kahan_sum"),
    ("sophia_h", "kahan_sum"),
    ("schedule_free_radam", "silent_sgd_phase"),
]


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))


@pytest.mark.filterwarnings("ignore:Lars. no param group")
@pytest.mark.parametrize(("name", "flag"), FLAGS)
def test_string_flag_is_rejected(name: str, flag: str) -> None:
    with pytest.raises(ValueError, match=rf"{flag}='false'\)? is invalid; expected True or False"):
        build_optimizer(_model(), name, lr=1e-3, **{flag: "false"})
    for value in (True, False):
        if (name, flag, value) == ("lars", "nesterov", True):
            continue  # needs momentum > 0 and dampening 0, checked on its own
        opt = build_optimizer(_model(), name, lr=1e-3, **{flag: value})
        assert all(g[flag] is value for g in opt.param_groups)


@pytest.mark.parametrize(("name", "key"), [("muon", "use_muon"), ("apollo", "use_apollo")])
def test_string_group_flag_is_rejected(name: str, key: str) -> None:
    """The per-group switch is a flag too: ``"false"`` must not put the group on the matrix path."""
    model = _model()
    groups = [{"params": [p], key: "false"} for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"\({key}='false'\) is invalid; expected True or False"):
        build_optimizer(groups, name, lr=1e-3)


def test_check_flag() -> None:
    assert check_flag("Lion", "kahan_sum", True) is True
    assert check_flag("Lion", "kahan_sum", False) is False
    for bad in ("false", 0, 1, None):
        with pytest.raises(ValueError, match=r"Lion\(kahan_sum=.*\) is invalid; expected True or False"):
            check_flag("Lion", "kahan_sum", bad)
