"""Every registered optimizer under every ``BF16Precision(mode="true")`` master-weights mode.

Per name and mode, on a tiny bf16 model (a LayerNorm kept in float32 among bf16 matrices): steps
stay finite and change the weights, the bf16 weights stay bf16, the plugin's buffers appear where
the mode puts them, and N steps + ``state_dict`` through ``torch.save`` + a fresh model, optimizer
and plugin + N steps equals 2N steps bit for bit. Per-name settings come from the contract suite's
``tests/contract_overrides.py`` (lr, hparams).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from lightning_opt import available_optimizers, build_optimizer, get_optimizer_info
from lightning_opt.plugins import BF16Precision
from lightning_opt.plugins.bf16 import COMP_KEY, MASTER_KEY, SEED_KEY
from tests.contract_overrides import OVERRIDES

MODES = ("fp32", "kahan", "stochastic", "none")
CASES = [pytest.param(n, m, id=f"{n}-{m}") for n in available_optimizers() for m in MODES]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(self.norm(self.fc1(x)))))


def _setup(name: str, mw: str):
    spec = OVERRIDES.get(name, {})
    plugin = BF16Precision(mode="true", master_weights=mw)
    model = plugin.convert_module(_Net())
    lr = spec.get("lr", get_optimizer_info(name).default_lr)
    opt = build_optimizer(model, name, lr=lr, **spec.get("hparams", {}))
    plugin.prepare_optimizer(opt)
    if get_optimizer_info(name).schedule_free:
        opt.train()
    return plugin, model, opt


def _steps(plugin, model, opt, start: int, n: int) -> None:
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)) for _ in range(start + n)]
    for x, y in batches[start:]:
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x.bfloat16()).float(), y).backward()
        plugin.step(opt)


def _snapshot(model, opt) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    state = {names[id(p)]: copy.deepcopy(dict(s)) for p, s in opt.state.items()}
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "state": state}


def _same(a, b) -> bool:
    """Equal values, dtypes included, through nested lists/tuples/dicts (SOAP's and Shampoo's factors)."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize(("name", "mw"), CASES)
def test_every_optimizer_in_every_mode(name, mw):
    plugin, model, opt = _setup(name, mw)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    _steps(plugin, model, opt, 0, 2)
    want = _snapshot(model, opt)
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if n.startswith("norm.") else torch.bfloat16), n
        assert torch.isfinite(p).all(), n
    assert any(not torch.equal(p, start[n]) for n, p in want["params"].items()), "2 steps changed nothing"
    bf16_states = [opt.state[p] for n, p in model.named_parameters() if p.dtype == torch.bfloat16 and opt.state.get(p)]
    keys = {k for s in bf16_states for k in s}
    if mw == "fp32":
        assert MASTER_KEY in keys
        masters = [s[MASTER_KEY] for s in bf16_states]
        assert all(m.dtype == torch.float32 for m in masters)
    elif mw == "kahan":
        assert COMP_KEY in keys or "kahan_comp" in keys
    elif mw == "stochastic":
        if plugin.route(opt) == "native":  # the optimizer's own step-seeded rounding: no plugin key
            assert all(g["stochastic_rounding"] for g in opt.param_groups) and SEED_KEY not in keys
        else:
            assert SEED_KEY in keys
    else:
        assert not keys & {MASTER_KEY, COMP_KEY, SEED_KEY}

    # N + save/load + N == 2N
    plugin, model, opt = _setup(name, mw)
    _steps(plugin, model, opt, 0, 1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "plugin": plugin.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    plugin, model, opt = _setup(name, mw)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    plugin.load_state_dict(ckpt["plugin"])
    _steps(plugin, model, opt, 1, 1)
    got = _snapshot(model, opt)
    for n, p in want["params"].items():
        assert torch.equal(p, got["params"][n]), f"{n} differs after resume"
    for n, s in want["state"].items():
        for k, v in s.items():
            assert _same(v, got["state"][n][k]), f"state {n}.{k} differs after resume"
