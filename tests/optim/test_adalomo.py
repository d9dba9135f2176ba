"""AdaLomo against the authors' ``lomo_optim.AdaLomo`` (lomo-optim 0.1.1) and a float64 recurrence.

The reference allocates its buffers with ``.cuda()``; on CPU the tests make ``Tensor.cuda`` a no-op
for its constructor, so its own math runs here (float32: it computes in float32 whatever the
parameter dtype). The float64 comparison is against a hand recurrence written from the paper's
equations (V = R C / mean(R), not the rsqrt-factor form the implementation uses)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_opt import build_optimizer, get_optimizer_info
from lightning_opt.optim.adalomo import AdaLomo

SHAPES = {"w": (6, 4), "v": (3, 7), "b": (5,)}
STEPS = 20
# non-default values, so that ignoring any of them would change the trajectory
HP = {"lr": 2e-2, "eps": (1e-3, 5e-2), "clip_threshold": 0.5, "decay_rate": -0.6, "weight_decay": 0.3}


class _Params(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32, shapes: dict = SHAPES) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        for k, s in shapes.items():
            t = torch.randn(s, generator=g, dtype=torch.float64)
            if k == "b":
                t = t * 1e-3  # RMS below eps2: the floor max(eps2, RMS(p)) is exercised
            self.register_parameter(k, nn.Parameter(t.to(dtype)))


def _grads(shapes: dict = SHAPES, steps: int = STEPS) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    # a wide range of magnitudes, so the update clipping triggers on some steps and not others
    return [
        {k: torch.randn(s, generator=g, dtype=torch.float64) * 10.0 ** (i % 3 - 1) for k, s in shapes.items()}
        for i in range(steps)
    ]


def _linear_loss(model: nn.Module, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    # d loss / d p == grads[p] exactly, whatever the parameters are
    return sum((p * grads[n].to(p.dtype)).sum() for n, p in model.named_parameters())


def one_step(model: nn.Module, opt, step_grads: dict[str, torch.Tensor], mode: str) -> None:
    """One step with ``backward()`` + ``step()`` (``mode="step"``) or ``fused_backward`` (gradients freed)."""
    if mode == "step":
        _linear_loss(model, step_grads).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    else:
        opt.fused_backward(_linear_loss(model, step_grads))
        assert all(p.grad is None for p in model.parameters())


@pytest.fixture
def reference(monkeypatch: pytest.MonkeyPatch):
    lomo_optim = pytest.importorskip("lomo_optim")
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    return lomo_optim.AdaLomo


@pytest.mark.parametrize("mode", ["step", "fused_backward"])
def test_matches_reference_float32(reference, mode: str) -> None:
    grads = _grads()
    ref_model, our_model = _Params(), _Params()
    ref = reference(ref_model, **HP)
    ours = AdaLomo(our_model.parameters(), **HP)
    for step_grads in grads:
        ref.fused_backward(_linear_loss(ref_model, step_grads), HP["lr"])
        if mode == "step":
            for n, p in our_model.named_parameters():
                p.grad = step_grads[n].float()
            ours.step()
        else:
            ours.fused_backward(_linear_loss(our_model, step_grads))
    for (n, a), b in zip(our_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")


def _hand_recurrence(
    params: dict[str, torch.Tensor],
    grads: list[dict[str, torch.Tensor]],
    *,
    lr,
    eps,
    clip_threshold,
    decay_rate,
    weight_decay,
) -> dict[str, torch.Tensor]:
    """AdaLomo from the paper in float64: factored V over the last two dims, RMS-normalized update."""
    p = {k: v.clone() for k, v in params.items()}
    r, c, v = {}, {}, {}
    for t, step_grads in enumerate(grads, start=1):
        beta = 1 - t**decay_rate
        for k, g in step_grads.items():
            sq = g * g + eps[0]
            if g.ndim >= 2:
                r[k] = beta * r.get(k, 0) + (1 - beta) * sq.mean(-1)
                c[k] = beta * c.get(k, 0) + (1 - beta) * sq.mean(-2)
                vhat = r[k][..., :, None] * c[k][..., None, :] / r[k].mean(-1)[..., None, None]
            else:
                v[k] = beta * v.get(k, 0) + (1 - beta) * sq
                vhat = v[k]
            u = g / vhat.sqrt()
            rms_u = math.sqrt(float((u * u).mean()))
            u = u / max(1.0, rms_u / clip_threshold)
            lr_t = lr * max(eps[1], math.sqrt(float((p[k] * p[k]).mean())))
            p[k] = p[k] * (1 - lr_t * weight_decay) - lr_t * u
    return p


def test_matches_paper_recurrence_float64_with_a_3d_tensor() -> None:
    shapes = {**SHAPES, "conv": (2, 3, 4)}  # factored over the last two dims
    grads = _grads(shapes)
    model = _Params(torch.float64, shapes)
    expected = _hand_recurrence({n: p.detach() for n, p in model.named_parameters()}, grads, **HP)
    opt = AdaLomo(model.parameters(), **HP)
    for step_grads in grads:
        for n, p in model.named_parameters():
            p.grad = step_grads[n]
        opt.step()
    assert opt.state[model.conv]["exp_avg_sq_row"].shape == (2, 3)
    assert opt.state[model.conv]["exp_avg_sq_col"].shape == (2, 4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], msg=lambda m, n=n: f"{n}: {m}")


def test_fused_backward_frees_gradients_and_equals_step() -> None:
    grads = _grads(steps=4)
    fused, plain = _Params(), _Params()
    opt_f, opt_p = AdaLomo(fused.parameters(), lr=1e-2), AdaLomo(plain.parameters(), lr=1e-2)
    for step_grads in grads:
        opt_f.fused_backward(_linear_loss(fused, step_grads))
        assert all(p.grad is None for p in fused.parameters())
        _linear_loss(plain, step_grads).backward()
        opt_p.step()
        opt_p.zero_grad(set_to_none=True)
    for a, b in zip(fused.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    # after fused_backward the hooks are inert: an ordinary backward keeps its gradients
    before = [p.detach().clone() for p in fused.parameters()]
    _linear_loss(fused, grads[0]).backward()
    assert all(p.grad is not None for p in fused.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, fused.parameters()))


def test_fused_backward_refuses_to_accumulate() -> None:
    model = _Params()
    opt = AdaLomo(model.parameters())
    _linear_loss(model, _grads(steps=1)[0]).backward()
    with pytest.raises(RuntimeError, match="cannot accumulate"):
        opt.fused_backward(_linear_loss(model, _grads(steps=1)[0]))


@pytest.mark.parametrize("impl", ["auto", "for_loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip(dtype: torch.dtype, impl: str) -> None:
    n = 4
    grads = _grads(steps=2 * n)

    def run(model, opt, gs):
        for step_grads in gs:
            for k, p in model.named_parameters():
                p.grad = step_grads[k].to(dtype)
            opt.step()

    straight = _Params(dtype)
    run(straight, AdaLomo(straight.parameters(), **HP, impl=impl), grads)
    first = _Params(dtype)
    opt1 = AdaLomo(first.parameters(), **HP, impl=impl)
    run(first, opt1, grads[:n])
    saved = copy.deepcopy(opt1.state_dict())
    resumed = _Params(dtype)
    resumed.load_state_dict(first.state_dict())
    opt2 = AdaLomo(resumed.parameters(), **HP, impl=impl)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["impl"] == impl
    assert opt2.state[resumed.w]["exp_avg_sq_row"].dtype == (torch.float32 if dtype is torch.bfloat16 else dtype)
    run(resumed, opt2, grads[n:])
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def fit_manual_fused(name: str, **hparams) -> tuple:
    """Train a small MLP one epoch (4 batches) under Lightning's manual optimization with ``fused_backward``.

    Returns ``(module, optimizer, before, data)``: the trained module, its optimizer, the initial
    parameters and the data (shared by the LOMO tests).
    """
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.optimizers().optimizer.fused_backward(loss)
            return loss

        def configure_optimizers(self):
            return build_optimizer(self, name, **hparams)

    torch.manual_seed(0)
    x = torch.randn(32, 4)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    module = Module()
    before = [p.detach().clone() for p in module.parameters()]
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    return module, trainer.optimizers[0], before, data


def test_lightning_manual_optimization_with_fused_backward() -> None:
    module, opt, before, _ = fit_manual_fused("adalomo", lr=1e-2)
    assert all(opt.state[p]["step"] == 4 for p in module.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -1.0}, "lr"),
        ({"eps": (1e-30,)}, "eps"),
        ({"clip_threshold": 0.0}, "clip_threshold"),
        ({"decay_rate": 0.5}, "decay_rate"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=rf"AdaLomo\({match}="):
        AdaLomo([nn.Parameter(torch.zeros(2))], **kwargs)


def test_registered() -> None:
    assert get_optimizer_info("adalomo").cls is AdaLomo


def test_refuses_dtensor_layouts_it_cannot_step() -> None:
    """FSDP2's Shard(0) is taken (tests/distributed/test_matrix_owner_compute.py steps it); other
    placements are refused at construction, fused_backward on shards when called."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group already exists")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        param = nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]))
        opt = AdaLomo([param])
        with pytest.raises(NotImplementedError, match="fused_backward does not run on FSDP2"):
            opt.fused_backward((param.to_local() ** 2).sum())
        other = nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Replicate()]))
        with pytest.raises(NotImplementedError, match="AdaLomo got a DTensor parameter.*fully_shard"):
            AdaLomo([other])
    finally:
        dist.destroy_process_group()


def test_impl_is_the_single_for_loop() -> None:
    """``impl`` takes "auto" and "for_loop" (the one implementation); others fail at construction."""
    assert AdaLomo.impls == ("for_loop",)
    for bad in ("foreach", "fused", "vectorized", None):
        expected = rf"AdaLomo\(impl={bad!r}\) is invalid; expected one of \('auto', 'for_loop'\)"
        with pytest.raises(ValueError, match=expected):
            AdaLomo([nn.Parameter(torch.zeros(2))], impl=bad)
    opt = AdaLomo([nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match=r"AdaLomo\(impl='foreach'\)"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "impl": "foreach"})
    assert len(opt.param_groups) == 1
    # a checkpoint from before the option loads with impl="auto"
    saved = opt.state_dict()
    del saved["param_groups"][0]["impl"]
    fresh = AdaLomo([nn.Parameter(torch.zeros(2))], impl="for_loop")
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["impl"] == "auto"


@pytest.mark.parametrize("mode", ["step", "fused_backward"])
def test_explicit_for_loop_equals_the_default(mode: str) -> None:
    grads = _grads(steps=5)
    models = {impl: _Params() for impl in ("auto", "for_loop")}
    for impl, model in models.items():
        opt = AdaLomo(model.parameters(), **HP, impl=impl)
        for step_grads in grads:
            one_step(model, opt, step_grads, mode)
    for a, b in zip(models["auto"].parameters(), models["for_loop"].parameters()):
        assert torch.equal(a, b)
