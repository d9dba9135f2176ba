"""Per-optimizer settings for the contract suite (tests/test_contract.py).

One entry per registry name that needs something other than the defaults; each key is explained
where it is read. Keep entries minimal and say why in a comment.
"""

from __future__ import annotations

from typing import Any

OVERRIDES: dict[str, dict[str, Any]] = {
    # the suite calls step() without the SophiaHessian callback, so h stays 0 and every step is a
    # sign step of size lr; at the default 1e-4, 300 steps are too few for the regression
    "sophia": {"lr": 1e-3, "why": "no Hessian refresh here: sign steps of size lr"},
    # RAdam-SF's default silent phase takes no step while rho_t <= 4 (the first 4 steps with
    # beta2=0.999), so "three steps change a parameter" needs the SGD-phase steps taken
    "schedule_free_radam": {"hparams": {"silent_sgd_phase": False}, "why": "the silent phase (first 4 steps) moves nothing"},
    # Lion moves every coordinate by lr per step; its default 1e-4 (meant for real models, 3-10x
    # below AdamW's) needs more than 300 steps on the toy regression
    "lion": {"lr": 1e-3, "why": "sign steps of size lr: the default 1e-4 is too slow for 300 steps"},
    # timm's LARS adapts only groups with weight_decay != 0; the suite's default wd=0 would make it
    # plain SGD at lr=1.0 (it warns), so always_adapt makes every test exercise the trust ratio
    "lars": {"hparams": {"always_adapt": True}, "why": "wd=0 groups are not adapted unless always_adapt"},
    # bitsandbytes' Lion8bit: the same sign steps as "lion" above, so the same too-slow default lr
    "lion_8bit": {"lr": 1e-3, "why": "sign steps of size lr: the default 1e-4 is too slow for 300 steps"},
    "paged_lion_8bit": {"lr": 1e-3, "why": "sign steps of size lr: the default 1e-4 is too slow for 300 steps"},
    # Lookahead with alpha=0.5 keeps about half of each k-step excursion, so the toy regression
    # needs its base's contract lr (lion) or a 3x larger one (radam: 0.31 of the first loss at 1e-3)
    "lookahead_lion": {"lr": 1e-3, "why": "as lion: the default 1e-4 is too slow for 300 steps"},
    "lookahead_radam": {"lr": 3e-3, "why": "alpha=0.5 halves progress; radam alone only reaches 0.24"},
    # as lars: NVLAMB adapts only wd != 0 groups, so at the suite's wd=0 lamb would be Adam (it
    # warns); with every tensor adapted, steps are lr * ||p|| and 1e-3 is too slow for 300 steps
    "lamb": {"lr": 1e-2, "hparams": {"always_adapt": True}, "why": "wd=0 groups are not adapted unless always_adapt"},
    "lookahead_lamb": {"lr": 1e-2, "hparams": {"always_adapt": True}, "why": "as lamb"},
    # torch 2.13's fused SGD kernel leaves bf16/fp16 parameters unchanged on the CPU (checked in
    # tests/optim/test_torch_builtin.py): impl="fused" refuses them with this error, which the suite expects
    "sgd": {"refuses": {("fused", "bfloat16"): "does not update"}, "why": "torch's fused CPU SGD ignores bf16"},
    "sgd_nesterov": {"refuses": {("fused", "bfloat16"): "does not update"}, "why": "as sgd"},
    "lookahead_sgd": {"refuses": {("fused", "bfloat16"): "does not update"}, "why": "as sgd"},
    # Shampoo's default precondition_frequency=100 (start = 100) would leave the suite's 3-16 step
    # tests in the Adam-grafting warm-up: refreshing every 2 steps runs the Kronecker factors, the
    # roots and their state through every test (save/load included)
    "shampoo": {"hparams": {"precondition_frequency": 2}, "why": "the default start step 100 is past the short tests"},
    # LOMO is plain SGD (no momentum): its reference default lr 1e-3 is too slow for 300 steps; the
    # suite also runs it with norm clipping on, so step()'s clipping passes every contract test
    "lomo": {"lr": 3e-2, "hparams": {"clip_grad_norm": 1.0}, "why": "plain SGD: 1e-3 is too slow for 300 steps"},
    # "name": {"lr": 1e-2, "hparams": {...}, "loss_threshold": 0.1, "steps": 60, "bf16": True},
}
