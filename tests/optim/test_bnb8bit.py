"""8-bit optimizers through bitsandbytes: real uint8 state, trajectories near the 32-bit algorithm,
exact 32-bit path for small tensors, checkpoint round trip, and the errors when bnb is unusable."""

from __future__ import annotations

import copy
import sys
import warnings

import pytest
import torch

from lightning_opt import build_optimizer
from lightning_opt.optim import bnb8bit
from lightning_opt.optim.lion import Lion

pytest.importorskip("bitsandbytes")

BIG = (64, 128)  # 8192 elements >= min_8bit_size (4096): 8-bit state
SMALL = (16, 16)  # 256 elements: float32 state


def _grads(shape: tuple[int, ...], steps: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


def _run(opt: torch.optim.Optimizer, p: torch.nn.Parameter, grads: list[torch.Tensor]) -> torch.Tensor:
    for grad in grads:
        p.grad = grad.to(p.dtype)
        opt.step()
    return p.detach().clone()


def _param(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype))


def _rel(a: torch.Tensor, b: torch.Tensor, p0: torch.Tensor) -> float:
    """Distance between two trajectories' end points relative to the distance travelled."""
    return float((a - b).norm() / (b - p0).norm())


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit", "lion_8bit", "paged_lion_8bit"])
def test_large_tensors_get_uint8_state_small_ones_float32(name: str) -> None:
    big, small = _param(BIG), _param(SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # paged on CPU: "falling back to non-paged"
        opt = build_optimizer([{"params": [big, small], "weight_decay": 0.0}], name, lr=1e-3)
        big.grad, small.grad = torch.randn(BIG), torch.randn(SMALL)
        opt.step()
    assert opt.state[big]["state1"].dtype == torch.uint8
    assert opt.state[big]["absmax1"].dtype == torch.float32
    assert opt.state[small]["state1"].dtype == torch.float32


def test_min_8bit_size_is_honoured() -> None:
    big = _param(BIG)
    opt = bnb8bit.adamw_8bit([big], min_8bit_size=BIG[0] * BIG[1] + 1)
    big.grad = torch.randn(BIG)
    opt.step()
    assert opt.state[big]["state1"].dtype == torch.float32


def test_paged_warns_and_falls_back_on_cpu() -> None:
    p = _param(BIG)
    opt = bnb8bit.paged_adamw_8bit([p])
    assert opt.is_paged
    p.grad = torch.randn(BIG)
    with pytest.warns(UserWarning, match="[Pp]aged"):
        opt.step()
    assert opt.state[p]["state1"].dtype == torch.uint8


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_float32_state_path_matches_torch_adamw(name: str) -> None:
    # small tensors keep fp32 state: the wrapper must pass lr, betas, eps and wd through exactly
    hp = {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.2}
    p, q = _param(SMALL), _param(SMALL)
    grads = _grads(SMALL, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = _run(
            build_optimizer(
                [{"params": [p], "weight_decay": hp["weight_decay"]}],
                name,
                **{k: v for k, v in hp.items() if k != "weight_decay"},
            ),
            p,
            grads,
        )
    ref = _run(torch.optim.AdamW([q], **hp), q, grads)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["lion_8bit", "paged_lion_8bit"])
def test_lion_8bit_float32_path_matches_our_lion(name: str) -> None:
    p, q = _param(SMALL), _param(SMALL)
    grads = _grads(SMALL, 20)
    ours = _run(getattr(bnb8bit, name)([p], lr=1e-3, betas=(0.8, 0.95), weight_decay=0.5), p, grads)
    ref = _run(Lion([q], lr=1e-3, betas=(0.8, 0.95), weight_decay=0.5), q, grads)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_adamw_8bit_trajectory_close_to_torch_adamw() -> None:
    p0 = _param(BIG)
    grads = _grads(BIG, 20)
    p, q, wrong = (torch.nn.Parameter(p0.detach().clone()) for _ in range(3))
    ours = _run(bnb8bit.adamw_8bit([p], lr=1e-2, weight_decay=0.1), p, grads)
    ref = _run(torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1), q, grads)
    rel = _rel(ours, ref, p0.detach())
    assert rel < 0.03, f"8-bit AdamW drifted {rel:.3f} from torch AdamW"
    # the tolerance is tight enough to catch a different algorithm: Adam with beta1=0.5
    bad = _run(torch.optim.AdamW([wrong], lr=1e-2, betas=(0.5, 0.999), weight_decay=0.1), wrong, grads)
    assert _rel(bad, ref, p0.detach()) > 0.1


def test_lion_8bit_trajectory_close_to_our_lion() -> None:
    p0 = _param(BIG)
    grads = _grads(BIG, 20)
    p, q, wrong = (torch.nn.Parameter(p0.detach().clone()) for _ in range(3))
    ours = _run(bnb8bit.lion_8bit([p], lr=1e-3, weight_decay=0.5), p, grads)
    ref = _run(Lion([q], lr=1e-3, weight_decay=0.5), q, grads)
    rel = _rel(ours, ref, p0.detach())
    assert rel < 0.05, f"8-bit Lion drifted {rel:.3f} from Lion"
    bad = _run(Lion([wrong], lr=1e-3, betas=(0.5, 0.99), weight_decay=0.5), wrong, grads)
    assert _rel(bad, ref, p0.detach()) > 0.15


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["adamw_8bit", "lion_8bit"])
def test_state_dict_round_trip_with_8bit_state(name: str, dtype: torch.dtype) -> None:
    n = 3
    grads = _grads(BIG, 2 * n)
    small_grads = _grads(SMALL, 2 * n, seed=1)

    def fresh() -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
        ps = [_param(BIG, dtype), _param(SMALL, dtype)]
        return ps, build_optimizer([{"params": ps, "weight_decay": 0.1}], name, lr=1e-3)

    def steps(ps, opt, k0, k1):
        for k in range(k0, k1):
            ps[0].grad, ps[1].grad = grads[k].to(dtype), small_grads[k].to(dtype)
            opt.step()

    straight, opt = fresh()
    steps(straight, opt, 0, 2 * n)
    first, opt1 = fresh()
    steps(first, opt1, 0, n)
    saved = copy.deepcopy(opt1.state_dict())
    resumed, opt2 = fresh()
    with torch.no_grad():
        for a, b in zip(resumed, first):
            a.copy_(b)
    opt2.load_state_dict(saved)
    assert opt2.state[resumed[0]]["state1"].dtype == torch.uint8
    assert opt2.state[resumed[1]]["state1"].dtype == torch.float32  # not cast to bf16
    steps(resumed, opt2, n, 2 * n)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_closure_called_once_with_grad_enabled() -> None:
    p = _param(SMALL)
    opt = bnb8bit.adamw_8bit([p])
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        p.grad = torch.ones(SMALL)
        return 1.0

    with torch.no_grad():
        assert opt.step(closure) == 1.0
    assert calls == [True]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -1.0}, "lr"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"eps": -1.0}, "eps"),
        ({"min_8bit_size": -1}, "min_8bit_size"),
        ({"weight_decay": float("nan")}, "weight_decay"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bnb8bit.adamw_8bit([_param(SMALL)], **kwargs)


@pytest.mark.parametrize(
    "name, fallback",
    [("adamw_8bit", "adamw"), ("paged_adamw_8bit", "adamw"), ("lion_8bit", "lion"), ("paged_lion_8bit", "lion")],
)
def test_missing_bitsandbytes_names_the_extra(monkeypatch: pytest.MonkeyPatch, name: str, fallback: str) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lightning-opt\[bnb\]'") as err:
        build_optimizer(torch.nn.Linear(4, 4), name, lr=1e-3)
    assert repr(fallback) in str(err.value)


@pytest.mark.parametrize("name, fallback", [("adamw_8bit", "adamw"), ("lion_8bit", "lion")])
def test_bitsandbytes_without_cpu_support_names_the_fallback(
    monkeypatch: pytest.MonkeyPatch, name: str, fallback: str
) -> None:
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "__version__", "0.49.2")
    with pytest.raises(RuntimeError, match=f"cannot run 8-bit optimizers on CPU.*'{fallback}'"):
        build_optimizer(torch.nn.Linear(4, 4), name, lr=1e-3)


def test_hugging_face_alias() -> None:
    from lightning_opt import get_optimizer_info

    assert get_optimizer_info("adamw_bnb_8bit").name == "adamw_8bit"
    for name in ("adamw_8bit", "paged_adamw_8bit", "lion_8bit", "paged_lion_8bit"):
        assert get_optimizer_info(name).extra == "bnb"
