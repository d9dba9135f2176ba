"""Lookahead against pytorch_optimizer.Lookahead and a float64 recurrence; checkpoints and groups."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_opt.optim import available_optimizers, build_optimizer, get_optimizer_info
from lightning_opt.optim.lion import Lion
from lightning_opt.optim.lookahead import LOOKAHEAD_BASES, Lookahead

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
lion_pytorch = pytest.importorskip("lion_pytorch")

SHAPES = [(6, 5), (5,), (3, 4)]


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in SHAPES]


def _grads(steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES] for _ in range(steps)]


def _run(opt, params, grads) -> list[torch.Tensor]:
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params]


def _groups(ps):
    return [{"params": ps[:2], "lr": 1e-2, "weight_decay": 0.1}, {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.0}]


@pytest.mark.parametrize("k, alpha", [(5, 0.5), (3, 0.8), (1, 0.3)])
def test_matches_pytorch_optimizer_over_adamw(k: int, alpha: float) -> None:
    grads = _grads(20)
    ps = _params()
    ours = _run(Lookahead(_groups(ps), base="adamw", k=k, alpha=alpha, base_hparams={"betas": (0.8, 0.95)}), ps, grads)
    qs = _params()
    ref_opt = pytorch_optimizer.Lookahead(torch.optim.AdamW(_groups(qs), betas=(0.8, 0.95)), k=k, alpha=alpha)
    ref = _run(ref_opt, qs, grads)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_lookahead_lion_matches_pytorch_optimizer_over_lion_pytorch() -> None:
    grads = _grads(20)
    ps = _params()
    ours = _run(build_optimizer(_groups(ps), "lookahead_lion", lr=1e-3, k=4, alpha=0.6), ps, grads)
    qs = _params()
    ref = _run(pytorch_optimizer.Lookahead(lion_pytorch.Lion(_groups(qs), lr=1e-3), k=4, alpha=0.6), qs, grads)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_matches_float64_recurrence_over_sgd() -> None:
    """Hand-written: SGD (no momentum) fast weights, slow <- slow + alpha (fast - slow) every k."""
    grads = _grads(20)
    ps = _params()
    ours = _run(build_optimizer(_groups(ps), "lookahead_sgd", lr=0.1, k=3, alpha=0.4), ps, grads)
    fast = [p.detach().clone() for p in _params()]
    slow = [p.clone() for p in fast]
    lrs, wds = [1e-2, 1e-2, 3e-3], [0.1, 0.1, 0.0]
    for t, step_grads in enumerate(grads, start=1):
        fast = [f - lr * (g + wd * f) for f, g, lr, wd in zip(fast, step_grads, lrs, wds)]  # torch SGD: L2 decay
        if t % 3 == 0:
            slow = [s + 0.4 * (f - s) for s, f in zip(slow, fast)]
            fast = [s.clone() for s in slow]
    for a, b in zip(ours, fast):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_k_and_alpha_are_used() -> None:
    grads = _grads(10)
    runs = {}
    # AdamW without decay moves independently of the weights, so syncs are linear in the moves:
    # k must not divide the 10 steps for k to show
    for kw in ({}, {"k": 3}, {"alpha": 0.9}):
        ps = _params()
        runs[str(kw)] = _run(Lookahead(ps, lr=1e-2, **kw), ps, grads)
    plain_ps = _params()
    plain = _run(torch.optim.AdamW(plain_ps, lr=1e-2, weight_decay=0.0), plain_ps, grads)

    def differ(a, b):
        return float((a - b).abs().max()) > 1e-4  # steps are ~lr = 1e-2

    assert differ(runs["{}"][0], plain[0]), "the default Lookahead equals plain AdamW"
    assert differ(runs["{}"][0], runs["{'k': 3}"][0])
    assert differ(runs["{}"][0], runs["{'alpha': 0.9}"][0])


def test_state_dict_round_trip_across_a_sync() -> None:
    """4 steps + save + load into a fresh wrapper + 4 steps == 8 steps (syncs at 3 and 6)."""
    grads = _grads(8)
    ps = _params()
    straight = _run(Lookahead(_groups(ps), k=3), ps, grads)
    first = _params()
    opt = Lookahead(_groups(first), k=3)
    _run(opt, first, grads[:4])
    saved = copy.deepcopy(opt.state_dict())
    assert all("lookahead_slow" in s for s in saved["state"].values())
    assert [g["lookahead_step"] for g in saved["param_groups"]] == [4, 4]
    resumed = [p.detach().clone().requires_grad_() for p in first]
    opt2 = Lookahead(_groups(resumed), k=3)
    opt2.load_state_dict(saved)
    assert opt2.state is opt2.base_optimizer.state and opt2.param_groups is opt2.base_optimizer.param_groups
    out = _run(opt2, resumed, grads[4:])
    for a, b in zip(straight, out):
        assert torch.equal(a, b)


def test_groups_are_shared_with_the_inner_optimizer_and_schedulers_work() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = build_optimizer(model, "lookahead_adamw", lr=1e-2, weight_decay=0.1, lr_multipliers={r"^0\.": 0.1}, k=2)
    assert opt.param_groups is opt.base_optimizer.param_groups
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == pytest.approx([1e-3, 1e-2])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    assert sorted({g["lr"] for g in opt.base_optimizer.param_groups}) == pytest.approx([5e-4, 5e-3])


def test_parameters_without_grad_are_left_alone() -> None:
    a, b = _params()[:2]
    opt = Lookahead([a, b], lr=1e-2, k=2)
    b_before = b.detach().clone()
    for g in _grads(5):
        a.grad = g[0].clone()
        opt.step()
    assert torch.equal(b, b_before) and len(opt.state[b]) == 0


def test_bf16_keeps_dtype() -> None:
    p = torch.randn(4, 4, dtype=torch.bfloat16, requires_grad=True)
    opt = Lookahead([p], lr=1e-2, base="lion", k=2)
    for _ in range(4):
        p.grad = torch.randn(4, 4, dtype=torch.bfloat16)
        opt.step()
    assert p.dtype == torch.bfloat16 and opt.state[p]["lookahead_slow"].dtype == torch.bfloat16
    assert isinstance(opt.base_optimizer, Lion)


def test_registry_names_and_validation() -> None:
    names = available_optimizers()
    assert {"lookahead", *(f"lookahead_{b}" for b in LOOKAHEAD_BASES)} <= set(names)
    assert get_optimizer_info("lookahead_sgd").default_lr == get_optimizer_info("sgd").default_lr
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, "lookahead", lr=1e-3, base="radam", k=6, base_hparams={"betas": (0.9, 0.99)})
    assert isinstance(opt.base_optimizer, torch.optim.RAdam) and opt.param_groups[0]["betas"] == (0.9, 0.99)
    with pytest.raises(TypeError, match="momentum"):
        build_optimizer(model, "lookahead", lr=1e-3, base="adamw", base_hparams={"momentum": 0.9})
    with pytest.raises(TypeError, match="momentum"):
        build_optimizer(model, "lookahead_adamw", lr=1e-3, momentum=0.9)
    with pytest.raises(ValueError, match="unknown optimizer"):
        Lookahead(model.parameters(), base="adamx")
    with pytest.raises(ValueError, match="k=0"):
        Lookahead(model.parameters(), k=0)
    with pytest.raises(ValueError, match="alpha=0"):
        Lookahead(model.parameters(), alpha=0)
    with pytest.raises(ValueError, match="nest"):
        Lookahead(model.parameters(), base="lookahead_adamw")
    if "schedule_free_adamw" in names:
        with pytest.raises(ValueError, match="not supported"):
            Lookahead(model.parameters(), base="schedule_free_adamw")


def test_lightning_fit_and_resume_from_checkpoint(tmp_path) -> None:
    """Under a Trainer: 1 epoch (6 steps) + checkpoint + resume for a 2nd == 2 epochs straight.

    Epochs, not max_steps: a run stopped by max_steps at an epoch's end resumes by repeating a batch.
    """
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return build_optimizer(self, "lookahead_adamw", lr=1e-2, weight_decay=0.1, k=4)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(48, 4, generator=g), torch.randn(48, 1, generator=g)
    )  # 6 batches: resume at an epoch end

    def fit(max_epochs: int, ckpt_path=None):
        model = Model()
        trainer = pl.Trainer(
            max_epochs=max_epochs,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(model, DataLoader(data, batch_size=8), ckpt_path=ckpt_path)
        return trainer, model

    _, straight = fit(2)
    trainer, _ = fit(1)
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    _, resumed = fit(2, ckpt_path=tmp_path / "one.ckpt")
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_deepcopy_keeps_the_inner_optimizer_shared() -> None:
    ps = _params()
    opt = Lookahead(_groups(ps), k=3)
    _run(opt, ps, _grads(2))
    twin = copy.deepcopy(opt)
    assert twin.param_groups is twin.base_optimizer.param_groups and twin.state is twin.base_optimizer.state
    assert twin.param_groups[0]["lookahead_step"] == 2
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    a = _run(opt, ps, _grads(3, seed=5))
    b = _run(twin, twin_params, _grads(3, seed=5))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_loads_a_checkpoint_of_the_bare_base_optimizer() -> None:
    ps = _params()
    plain = torch.optim.AdamW(_groups(ps))
    _run(plain, ps, _grads(2))
    opt = Lookahead(_groups(ps), k=2, alpha=0.5)
    opt.load_state_dict(plain.state_dict())
    assert [g["lookahead_k"] for g in opt.param_groups] == [2, 2]
    _run(opt, ps, _grads(2, seed=7))  # first step sets the slow weights, the second syncs
    assert all("lookahead_slow" in opt.state[p] for p in ps)
