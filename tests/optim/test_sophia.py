"""SophiaG against the official code (``sophia-opt`` 0.2.2) and SophiaH against
``pytorch_optimizer.SophiaH``: float64, 20 steps, injected Hessian estimates."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_opt.optim.registry import make_callbacks
from lightning_opt import build_optimizer, get_optimizer_info
from lightning_opt.optim import resolve
from lightning_opt.optim.sophia import SophiaG, SophiaH, gnb_estimate, hutchinson_estimate

K = 3  # Hessian refresh period in the reference runs


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)]


@pytest.mark.parametrize(
    "kw",
    [
        {"lr": 0.01},  # defaults otherwise (betas, rho, weight_decay)
        {"lr": 0.02, "betas": (0.9, 0.95), "rho": 0.05, "weight_decay": 0.2},
        {"lr": 0.01, "rho": 0.01, "weight_decay": 0.0, "betas": (0.5, 0.8)},
    ],
)
@pytest.mark.parametrize("bs", [64, 5120])
def test_sophia_g_matches_official(kw, bs) -> None:
    sophia_opt = pytest.importorskip("sophia_opt")
    pa = [p.clone().requires_grad_() for p in _params()]
    pb = [p.clone().requires_grad_() for p in _params()]
    # two groups with their own lr, so the per-group lr is honoured too
    oa = SophiaG([{"params": [pa[0]]}, {"params": [pa[1]], "lr": 0.003}], bs=bs, **kw)
    ob = sophia_opt.SophiaG([{"params": [pb[0]]}, {"params": [pb[1]], "lr": 0.003}], **kw)
    # sampled-label gradients scaled so that rho * bs * h is comparable to |m|: some coordinates
    # are clipped and some preconditioned (otherwise h would not matter)
    scale = (2.0 / (kw.get("rho", 0.04) * bs)) ** 0.5
    g = torch.Generator().manual_seed(1)
    for t in range(1, 21):
        for a, b in zip(pa, pb):
            gr = torch.randn(a.shape, generator=g, dtype=torch.float64)
            a.grad, b.grad = gr.clone(), gr.clone()
        oa.step()
        ob.step(bs=bs)
        if t % K == 0:
            # the official training loop: a sampled-label backward, then update_hessian() on p.grad
            for a, b in zip(pa, pb):
                gh = scale * torch.randn(a.shape, generator=g, dtype=torch.float64)
                a.grad, b.grad = gh.clone(), gh.clone()
            oa.update_hessian()
            ob.update_hessian()
        for a, b in zip(pa, pb):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(oa.state[a]["hessian"], ob.state[b]["hessian"])
        torch.testing.assert_close(oa.state[a]["exp_avg"], ob.state[b]["exp_avg"])
    assert 0.1 < oa.clip_fraction() < 0.9  # some coordinates clipped, some preconditioned


@pytest.mark.parametrize(
    "ref_kw",
    [
        {"lr": 0.5, "p": 0.05},
        {"lr": 0.2, "p": 0.02, "betas": (0.9, 0.95), "weight_decay": 0.01, "eps": 1e-3},
    ],
)
def test_sophia_h_matches_pytorch_optimizer(ref_kw) -> None:
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    ref_kw = {"betas": (0.96, 0.99), "weight_decay": 0.0, "eps": 1e-12, **ref_kw}
    clip = ref_kw["p"]
    # theirs: lr' clamp(m / max(h, eps'), -p, p); ours: lr clip(m / max(rho h, eps), 1)
    ours = {
        "lr": ref_kw["lr"] * clip,
        "rho": clip,
        "eps": clip * ref_kw["eps"],
        "weight_decay": ref_kw["weight_decay"] / clip,
        "betas": ref_kw["betas"],
    }
    pa = [p.clone().requires_grad_() for p in _params(2)]
    pb = [p.clone().requires_grad_() for p in _params(2)]
    oa = SophiaH(pa, **ours)
    ob = pytorch_optimizer.SophiaH(pb, update_period=K, **ref_kw)
    g = torch.Generator().manual_seed(5)
    for t in range(1, 21):
        for a, b in zip(pa, pb):
            gr = torch.randn(a.shape, generator=g, dtype=torch.float64)
            a.grad, b.grad = gr.clone(), gr.clone()
        if (t - 1) % K == 0:  # the paper's t mod k = 1: refresh before the update
            # Hutchinson estimates can be negative: the max(., eps) floor must keep the step direction
            est = [torch.randn(a.shape, generator=g, dtype=torch.float64) + 0.5 for a in pa]
            oa.update_hessian([e.clone() for e in est])
            ob.step(hessian=[e.clone() for e in est])
        else:
            ob.step()
        oa.step()
        for a, b in zip(pa, pb):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_eps_floor_against_the_paper_formula() -> None:
    # a float64 hand recurrence of the paper's Algorithm 3 with a large eps, so eps matters
    lr, b1, b2, rho, eps, wd = 0.1, 0.9, 0.9, 0.5, 0.3, 0.1
    p = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    opt = SophiaH([p], lr=lr, betas=(b1, b2), rho=rho, eps=eps, weight_decay=wd)
    x, m, h = p.detach().clone(), torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for t in range(1, 21):
        gr = torch.randn(4, generator=g, dtype=torch.float64)
        if t % 2 == 1:
            est = torch.randn(4, generator=g, dtype=torch.float64)
            opt.update_hessian([est])
            h = b2 * h + (1 - b2) * est
        p.grad = gr
        opt.step()
        x = x * (1 - lr * wd)
        m = b1 * m + (1 - b1) * gr
        x = x - lr * torch.clamp(m / torch.maximum(rho * h, torch.full_like(h, eps)), -1.0, 1.0)
    torch.testing.assert_close(p.detach(), x, rtol=1e-12, atol=1e-14)


def test_no_hessian_means_sign_steps_of_size_lr() -> None:
    p = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = SophiaG([p], lr=0.01, weight_decay=0.0)
    p.grad = torch.tensor([1.0, -2.0, 3e-9, -4e-9, 0.0], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.01, 0.01, -0.01, 0.01, 0.0], dtype=torch.float64))


def test_update_hessian_errors() -> None:
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"SophiaH.update_hessian needs estimates"):
        SophiaH([p]).update_hessian()
    with pytest.raises(ValueError, match=r"got 2 estimates for 1 parameters"):
        SophiaH([p]).update_hessian([torch.ones(3), torch.ones(3)])
    with pytest.raises(ValueError, match=r"estimate of shape \(4,\) for a parameter of shape \(3,\)"):
        SophiaG([p]).update_hessian([torch.ones(4)])


def test_gnb_estimate_squares() -> None:
    g = torch.tensor([1.0, -3.0])
    assert torch.equal(gnb_estimate([g, None])[0], torch.tensor([1.0, 9.0])) and gnb_estimate([None]) == [None]


def test_hutchinson_is_exact_for_a_diagonal_hessian_with_rademacher_probes() -> None:
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    unused = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    a = torch.tensor([2.0, -1.0, 5.0], dtype=torch.float64)
    loss = 0.5 * (a * w * w).sum() + (w[0] * w[0] * w[0])  # H = diag(a) + diag(6 w0, 0, 0)
    est, none = hutchinson_estimate(
        loss, [w, unused], distribution="rademacher", generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(est, torch.tensor([8.0, -1.0, 5.0], dtype=torch.float64))
    assert none is None


def test_hutchinson_num_samples_and_distribution() -> None:
    # a dense Hessian: one probe is noisy, the mean of many approaches the diagonal
    torch.manual_seed(0)
    a = torch.randn(4, 4, dtype=torch.float64)
    hess = a @ a.T + torch.eye(4, dtype=torch.float64)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def est(n: int, dist: str, seed: int = 1) -> torch.Tensor:
        loss = 0.5 * w @ hess @ w
        return hutchinson_estimate(
            loss, [w], num_samples=n, distribution=dist, generator=torch.Generator().manual_seed(seed)
        )[0]

    many = est(4000, "gaussian")
    torch.testing.assert_close(many, torch.diagonal(hess), rtol=0.15, atol=0.3)
    # num_samples=n is the mean of the n single-probe estimates drawn in sequence
    gen = torch.Generator().manual_seed(7)
    singles = [hutchinson_estimate(0.5 * w @ hess @ w, [w], generator=gen)[0] for _ in range(3)]
    torch.testing.assert_close(est(3, "gaussian", 7), sum(singles) / 3)
    assert not torch.allclose(est(1, "gaussian"), est(1, "rademacher"))
    with pytest.raises(ValueError, match="distribution='uniform'"):
        est(1, "uniform")


def test_bf16_params_keep_fp32_state_and_round_trip() -> None:
    torch.manual_seed(0)
    p = torch.randn(16).to(torch.bfloat16).requires_grad_()
    opt = SophiaG([p], lr=1e-2)
    p.grad = torch.randn(16).to(torch.bfloat16)
    opt.update_hessian([torch.rand(16)])
    opt.step()
    assert p.dtype == torch.bfloat16 and opt.state[p]["exp_avg"].dtype == torch.float32
    saved = copy.deepcopy(opt.state_dict())
    fresh = SophiaG([p], lr=1e-2)
    fresh.load_state_dict(saved)
    assert fresh.state[p]["hessian"].dtype == torch.float32
    torch.testing.assert_close(fresh.state[p]["hessian"], opt.state[p]["hessian"])


@pytest.mark.parametrize("cls", [SophiaG, SophiaH])
def test_kahan_sum_keeps_small_bf16_steps(cls) -> None:
    # h = 0, so every step is a sign step of size lr = 1e-4: below bf16's resolution near 1 (2**-8)
    def run(dtype: torch.dtype, kahan: bool) -> tuple[torch.Tensor, torch.optim.Optimizer]:
        p = torch.ones(64, dtype=dtype, requires_grad=True)
        opt = cls([p], lr=1e-4, weight_decay=0.0, kahan_sum=kahan)
        for _ in range(20):
            p.grad = torch.ones(64, dtype=dtype)
            opt.step()
        return p.detach(), opt

    ref, _ = run(torch.float32, False)
    torch.testing.assert_close(ref, torch.full((64,), 1 - 20e-4))
    lost, _ = run(torch.bfloat16, False)
    assert torch.equal(lost.float(), torch.ones(64))  # every step rounded away
    kept, opt = run(torch.bfloat16, True)
    comp = opt.state[opt.param_groups[0]["params"][0]]["kahan_comp"]
    assert kept.dtype == comp.dtype == torch.bfloat16 and (kept.float() < 1).all()
    torch.testing.assert_close(kept.float() + comp.float(), ref, rtol=0, atol=1e-5)
    fp32, opt32 = run(torch.float32, True)  # no buffer for float32 parameters, same result
    assert torch.equal(fp32, ref) and "kahan_comp" not in opt32.state[opt32.param_groups[0]["params"][0]]


@pytest.mark.parametrize(
    ("cls", "kw", "match"),
    [
        (SophiaG, {"lr": -1.0}, r"SophiaG\(lr=-1.0\)"),
        (SophiaG, {"rho": float("inf")}, r"SophiaG\(rho=inf\)"),
        (SophiaG, {"bs": 0}, r"SophiaG\(bs=0\).*> 0"),
        (SophiaG, {"betas": (0.9, 1.0)}, r"SophiaG\(betas=\(0.9, 1.0\)\)"),
        (SophiaH, {"eps": -1e-12}, r"SophiaH\(eps=-1e-12\)"),
        (SophiaH, {"weight_decay": -0.1}, r"SophiaH\(weight_decay=-0.1\)"),
        (SophiaH, {"kahan_sum": 1}, r"SophiaH\(kahan_sum=1\)"),
    ],
)
def test_rejects_invalid_hyperparameters(cls, kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        cls([torch.zeros(2, requires_grad=True)], **kw)


def test_registry_entries_and_deepspeed_alias() -> None:
    from lightning_opt.callbacks import SophiaHessian

    for name, cls in (("sophia", SophiaG), ("sophia_h", SophiaH)):
        info = get_optimizer_info(name)
        assert info.cls is cls
        assert [type(cb) for cb in make_callbacks(info)] == [SophiaHessian]
    assert resolve("SophiaOptimizer")[0].name == "sophia"
    opt = build_optimizer(torch.nn.Linear(3, 2), "sophiaoptimizer", lr=1e-3, weight_decay=0.1, bs=128, rho=0.05)
    assert isinstance(opt, SophiaG) and opt.param_groups[0]["bs"] == 128
    with pytest.raises(TypeError, match="sophia_h takes no 'bs'"):
        build_optimizer(torch.nn.Linear(3, 2), "sophia_h", lr=1e-3, bs=128)
