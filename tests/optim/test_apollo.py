"""APOLLO / APOLLO-Mini against the authors' ``apollo_torch.APOLLOAdamW`` (apollo-torch 1.0.3) and
against the paper's Algorithm 1.

Same initial weights, same gradients, 20 steps, float64, projections refreshed during the run; the
reference's seeds are matched, so no projection is injected. ``convention="reference"`` is compared
with the reference; the default ``convention="paper"`` with a float64 recurrence of Algorithm 1 that
draws its projections with the reference's own ``stable_randn``/``next_seed`` and steps the other
parameters with ``torch.optim.AdamW``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_opt import build_optimizer, get_optimizer_info
from lightning_opt.optim.apollo import APOLLO, APOLLOMini, next_projection_seed, random_projection

apollo_torch = pytest.importorskip("apollo_torch")

# a tall and a wide matrix (both projection sides), a 1-D and a 2-D parameter on the AdamW side
SHAPES = {"tall": (12, 8), "wide": (6, 10), "bias": (10,), "square": (5, 5)}
STEPS = 20


def _params(dtype: torch.dtype = torch.float64) -> dict[str, nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return {k: nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for k, s in SHAPES.items()}


def _grads(steps: int = STEPS, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()} for _ in range(steps)]


def _run(opt: torch.optim.Optimizer, params: dict[str, nn.Parameter], grads: list[dict[str, torch.Tensor]]) -> None:
    for step_grads in grads:
        for k, p in params.items():
            p.grad = step_grads[k].to(p.dtype)
        opt.step()


def _reference(params, *, lr, wd, rank, scale, scale_type, gap, scale_front=False, disable_nl=False):
    groups = [
        {
            "params": [params["tall"], params["wide"]],
            "rank": rank,
            "proj": "random",
            "scale_type": scale_type,
            "scale": scale,
            "update_proj_gap": gap,
            "proj_type": "std",
        },
        {"params": [params["bias"], params["square"]]},
    ]
    return apollo_torch.APOLLOAdamW(
        groups, lr=lr, betas=(0.9, 0.99), eps=1e-6, weight_decay=wd, scale_front=scale_front, disable_nl=disable_nl
    )


def _ours(params, cls=APOLLO, **kwargs):
    kwargs.setdefault("convention", "reference")
    groups = [
        {"params": [params["tall"], params["wide"]], "param_names": ["tall", "wide"], "use_apollo": True},
        {"params": [params["bias"], params["square"]], "param_names": ["bias", "square"], "use_apollo": False},
    ]
    return cls(groups, betas=(0.9, 0.99), eps=1e-6, **kwargs)


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_matches_reference_float64(scale_type: str) -> None:
    grads = _grads()
    ref_params, our_params = _params(), _params()
    _run(_reference(ref_params, lr=1e-2, wd=0.1, rank=3, scale=2.0, scale_type=scale_type, gap=7), ref_params, grads)
    _run(
        _ours(our_params, lr=1e-2, weight_decay=0.1, rank=3, scale=2.0, scale_type=scale_type, update_proj_gap=7),
        our_params,
        grads,
    )
    for k in SHAPES:
        torch.testing.assert_close(our_params[k], ref_params[k], msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize(
    "scale_front, limit, disable_nl", [(True, 1.01, False), (False, None, True), (True, None, True)]
)
def test_scale_front_and_limiter_options_match_reference(
    scale_front: bool, limit: float | None, disable_nl: bool
) -> None:
    grads = _grads()
    ref_params, our_params = _params(), _params()
    _run(
        _reference(
            ref_params,
            lr=1e-2,
            wd=0.0,
            rank=2,
            scale=9.0,
            scale_type="channel",
            gap=5,
            scale_front=scale_front,
            disable_nl=disable_nl,
        ),
        ref_params,
        grads,
    )
    _run(
        _ours(
            our_params, lr=1e-2, rank=2, scale=9.0, update_proj_gap=5, scale_front=scale_front, norm_growth_limit=limit
        ),
        our_params,
        grads,
    )
    for k in SHAPES:
        torch.testing.assert_close(our_params[k], ref_params[k])


def test_norm_growth_limit_value_is_used() -> None:
    # a limit no update norm can reach turns the limiter off: equal to the reference's disable_nl,
    # and different from the default 1.01 (which the test above matches)
    grads = _grads()
    ref_params, loose, tight = _params(), _params(), _params()
    _run(
        _reference(ref_params, lr=1e-2, wd=0.0, rank=2, scale=1.0, scale_type="channel", gap=5, disable_nl=True),
        ref_params,
        grads,
    )
    _run(_ours(loose, lr=1e-2, rank=2, update_proj_gap=5, norm_growth_limit=1e30), loose, grads)
    _run(_ours(tight, lr=1e-2, rank=2, update_proj_gap=5, norm_growth_limit=1.0), tight, grads)
    torch.testing.assert_close(loose["tall"], ref_params["tall"])
    assert not torch.allclose(tight["tall"], ref_params["tall"])


def test_apollo_mini_matches_reference_rank1_tensor_scale128() -> None:
    grads = _grads()
    ref_params, our_params = _params(), _params()
    _run(_reference(ref_params, lr=1e-3, wd=0.05, rank=1, scale=128.0, scale_type="tensor", gap=6), ref_params, grads)
    opt = _ours(our_params, cls=APOLLOMini, lr=1e-3, weight_decay=0.05, update_proj_gap=6)
    _run(opt, our_params, grads)
    for k in SHAPES:
        torch.testing.assert_close(our_params[k], ref_params[k])
    assert opt.state[our_params["tall"]]["exp_avg"].shape == (12, 1)  # rank-1 state
    assert opt.state[our_params["wide"]]["exp_avg"].shape == (1, 10)


def test_float32_matches_reference() -> None:
    grads = _grads()
    ref_params, our_params = _params(torch.float32), _params(torch.float32)
    _run(_reference(ref_params, lr=1e-2, wd=0.1, rank=3, scale=1.0, scale_type="channel", gap=7), ref_params, grads)
    _run(_ours(our_params, lr=1e-2, weight_decay=0.1, rank=3, update_proj_gap=7), our_params, grads)
    for k in SHAPES:
        torch.testing.assert_close(our_params[k], ref_params[k], rtol=1e-5, atol=1e-6)


def test_projection_seed_chain() -> None:
    # the projection for a (12, 8) weight at seed s is N(0, 1/r) from a CPU generator; seeds chain
    p = random_projection((12, 8), 3, 5)
    gen = torch.Generator().manual_seed(5)
    torch.testing.assert_close(p, torch.randn(3, 8, generator=gen) / 3**0.5)
    assert random_projection((6, 10), 3, 5).shape == (6, 3)
    assert next_projection_seed(5) != 5 and next_projection_seed(5) == next_projection_seed(5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_across_projection_refresh(dtype: torch.dtype) -> None:
    n = 5  # update_proj_gap=3: refreshes at steps 0, 3, 6, 9, on both sides of the save
    grads = _grads(2 * n)

    def fresh():
        params = _params(dtype)
        return params, _ours(params, lr=1e-2, weight_decay=0.1, rank=2, update_proj_gap=3)

    straight, opt = fresh()
    _run(opt, straight, grads)
    first, opt1 = fresh()
    _run(opt1, first, grads[:n])
    saved = copy.deepcopy(opt1.state_dict())
    resumed, opt2 = fresh()
    with torch.no_grad():
        for k in SHAPES:
            resumed[k].copy_(first[k])
    opt2.load_state_dict(saved)
    assert opt2.state[resumed["tall"]]["proj"].dtype == (torch.float32 if dtype is torch.bfloat16 else dtype)
    _run(opt2, resumed, grads[n:])
    for k in SHAPES:
        assert torch.equal(straight[k], resumed[k]), k


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.attn = nn.Linear(8, 8)
        self.mlp = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 20)


def _mask(opt: APOLLO) -> dict[str, bool]:
    return {n: m for g in opt.param_groups for n, m in zip(g["param_names"], g["apollo_mask"])}


def test_target_modules_select_weights_by_name() -> None:
    opt = build_optimizer(_Block(), "apollo", lr=1e-2, rank=2, target_modules=[r"attn", r"^mlp\."])
    on = {n for n, m in _mask(opt).items() if m}
    assert on == {"attn.weight", "mlp.weight"}  # biases under attn/mlp stay on AdamW


def test_default_targets_every_hidden_matrix() -> None:
    opt = build_optimizer(_Block(), "apollo", lr=1e-2, rank=2)
    on = {n for n, m in _mask(opt).items() if m}
    assert on == {"attn.weight", "mlp.weight"}  # not the embedding nor the head


def test_target_modules_change_the_trajectory() -> None:
    # the option is not ignored: APOLLO and AdamW move a selected weight differently
    def run(targets):
        torch.manual_seed(0)
        model = _Block()
        opt = build_optimizer(model, "apollo", lr=1e-2, rank=2, target_modules=targets)
        for _ in range(3):
            model.attn.weight.grad = torch.ones(8, 8)
            model.mlp.weight.grad = torch.ones(16, 8)
            opt.step()
        return model.attn.weight.detach().clone()

    assert not torch.allclose(run([r"attn"]), run([r"mlp"]))


def test_pattern_matching_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"\['q_proj'\] match no 2-D parameter"):
        build_optimizer(_Block(), "apollo", lr=1e-2, target_modules=[r"attn", r"q_proj"])
    with pytest.raises(ValueError, match="match no 2-D parameter"):
        build_optimizer(_Block(), "apollo", lr=1e-2, target_modules=r"norm")  # only 1-D params there


def test_target_modules_need_names() -> None:
    with pytest.raises(ValueError, match="needs parameter names"):
        APOLLO(nn.Linear(4, 4).parameters(), target_modules=["weight"])


def test_use_apollo_on_a_vector_is_an_error() -> None:
    with pytest.raises(ValueError, match="use_apollo=True"):
        APOLLO([{"params": [nn.Parameter(torch.zeros(3))], "use_apollo": True}])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0}, "rank"),
        ({"scale": 0.0}, "scale"),
        ({"scale_type": "row"}, "scale_type"),
        ({"update_proj_gap": 0}, "update_proj_gap"),
        ({"proj": "svd"}, "proj"),
        ({"norm_growth_limit": 0.5}, "norm_growth_limit"),
        ({"lr": -1.0}, "lr"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"eps": -1.0}, "eps"),
        ({"target_modules": ["("]}, "target_modules"),
        ({"convention": "hf"}, "convention"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=rf"APOLLO\({match}="):
        APOLLO([nn.Parameter(torch.zeros(4, 4))], **kwargs)


def test_apollo_mini_fixes_rank_and_scale_type() -> None:
    with pytest.raises(TypeError, match="rank"):
        build_optimizer(_Block(), "apollo_mini", lr=1e-2, rank=4)
    opt = build_optimizer(_Block(), "apollo_mini", lr=1e-2)
    group = opt.param_groups[0]
    assert (group["rank"], group["scale_type"], group["scale"]) == (1, "tensor", 128.0)


def test_hugging_face_alias() -> None:
    assert get_optimizer_info("apollo_adamw").name == "apollo"


def test_closure_called_once_with_grad_enabled() -> None:
    p = nn.Parameter(torch.randn(4, 4))
    opt = APOLLO([p], rank=2)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        p.grad = torch.ones(4, 4)
        return 1.0

    with torch.no_grad():
        assert opt.step(closure) == 1.0
    assert calls == [True]


def test_refuses_dtensor_layouts_it_cannot_step() -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group already exists")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        param = nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]))
        APOLLO([param], rank=2)  # FSDP2's Shard(0): owner-compute (tests/distributed)
        with pytest.raises(ValueError, match=r"APOLLO\(distributed='local'\) got a DTensor"):
            APOLLO([param], rank=2, distributed="local")
        other = nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Replicate()]))
        with pytest.raises(NotImplementedError, match="APOLLO got a DTensor parameter.*fully_shard"):
            APOLLO([other], rank=2)
    finally:
        dist.destroy_process_group()


def _paper_recurrence(params, grads, *, lr, wd, rank, scale, scale_type, gap, limit=1.01, betas=(0.9, 0.99), eps=1e-6):
    """Algorithm 1 of the paper in float64 (the limiter acts before the sqrt(scale) factor)."""
    from apollo_torch.random_projector import next_seed, stable_randn

    b1, b2 = betas
    weights = {k: params[k].detach().clone() for k in ("tall", "wide")}
    seeds = {"tall": 1, "wide": 2}  # 1-based positions in the optimizer, as the reference seeds them
    state = {k: {} for k in weights}
    for t, step_grads in enumerate(grads, start=1):
        for k, w in weights.items():
            g, st = step_grads[k], state[k]
            rows, cols = g.shape
            if (t - 1) % gap == 0:
                shape = (rank, cols) if rows >= cols else (rows, rank)
                st["P"] = stable_randn(shape, seed=seeds[k]).double() / math.sqrt(rank)
                seeds[k] = next_seed(seeds[k])
            r = g @ st["P"].T if rows >= cols else st["P"].T @ g
            st["m"] = b1 * st.get("m", 0) + (1 - b1) * r
            st["v"] = b2 * st.get("v", 0) + (1 - b2) * r * r
            r_tilde = (st["m"] / (1 - b1**t)) / ((st["v"] / (1 - b2**t)).sqrt() + eps)
            if scale_type == "tensor":
                u = g * (r_tilde.norm() / (r.norm() + 1e-8))
            elif rows >= cols:
                u = g * (r_tilde.norm(dim=1) / (r.norm(dim=1) + 1e-8))[:, None]
            else:
                u = g * (r_tilde.norm(dim=0) / (r.norm(dim=0) + 1e-8))[None, :]
            if "prev" in st:
                ratio = float(u.norm() / (st["prev"] + 1e-8))
                if ratio > limit:
                    u = u * (limit / ratio)
            st["prev"] = u.norm()
            weights[k] = w * (1 - lr * wd) - lr * math.sqrt(scale) * u
    return weights


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_paper_convention_matches_algorithm_1_float64(scale_type: str) -> None:
    grads = _grads()
    ours, adamw_side, ref_params = _params(), _params(), _params()
    hp = {"lr": 1e-2, "rank": 3, "scale": 2.0, "scale_type": scale_type}
    expected = _paper_recurrence(_params(), grads, wd=0.1, gap=7, **hp)
    _run(_ours(ours, weight_decay=0.1, update_proj_gap=7, convention="paper", **hp), ours, grads)
    for k in ("tall", "wide"):
        torch.testing.assert_close(ours[k].detach(), expected[k], msg=lambda m, k=k: f"{k}: {m}")
    # the other parameters get torch's AdamW
    torch_opt = torch.optim.AdamW(
        [adamw_side["bias"], adamw_side["square"]], lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1
    )
    _run(torch_opt, {k: adamw_side[k] for k in ("bias", "square")}, grads)
    for k in ("bias", "square"):
        torch.testing.assert_close(ours[k], adamw_side[k])
    # and the conventions really differ (the option is not ignored)
    _run(_reference(ref_params, lr=1e-2, wd=0.1, rank=3, scale=2.0, scale_type=scale_type, gap=7), ref_params, grads)
    for k in SHAPES:
        assert not torch.allclose(ours[k], ref_params[k], rtol=1e-9, atol=0), k


def test_paper_is_the_default() -> None:
    assert APOLLO([nn.Parameter(torch.zeros(4, 4))]).param_groups[0]["convention"] == "paper"


# ---- the engine: phases, the shared AdamW side, impls ----

IMPL_SHAPES = {"tall": (33, 7), "wide": (7, 33), "bias": (33,), "square": (7, 7), "gain": (1,)}


def _run_impl(impl: str, dtype: torch.dtype, wd: float, convention: str, steps: int = 20):
    g = torch.Generator().manual_seed(0)
    params = {k: nn.Parameter(torch.randn(s, generator=g).to(dtype)) for k, s in IMPL_SHAPES.items()}
    groups = [
        {"params": [params["tall"], params["wide"]], "param_names": ["tall", "wide"], "use_apollo": True},
        {"params": [params[k] for k in ("bias", "square", "gain")], "param_names": ["bias", "square", "gain"]},
    ]
    opt = APOLLO(groups, lr=1e-2, weight_decay=wd, rank=3, update_proj_gap=7, convention=convention, impl=impl)
    gg = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=gg).to(dtype)
        opt.step()
    return params, opt


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.dtype == ref.dtype
    if ref.dtype is torch.bfloat16:
        step = torch.finfo(ref.dtype).eps * float(ref.abs().max())
        torch.testing.assert_close(got, ref, rtol=1.6e-2, atol=max(step, 1e-5))
    else:
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("convention", ["paper", "reference"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["foreach", "auto"])
def test_impl_equals_for_loop_over_20_steps(impl: str, dtype: torch.dtype, wd: float, convention: str) -> None:
    ref, ref_opt = _run_impl("for_loop", dtype, wd, convention)
    got, got_opt = _run_impl(impl, dtype, wd, convention)
    for k in IMPL_SHAPES:
        _close(got[k].detach(), ref[k].detach())
        for key, value in ref_opt.state[ref[k]].items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                _close(got_opt.state[got[k]][key], value)
            else:
                assert got_opt.state[got[k]][key] == value


def test_impl_is_checked_and_backfilled() -> None:
    w = nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"APOLLO\(impl='fused'\)"):
        APOLLO([w], impl="fused")
    with pytest.raises(ValueError, match=r"APOLLOMini\(impl='fast'\)"):
        APOLLOMini([w], impl="fast")
    opt = APOLLO([w], impl="foreach")
    state = opt.state_dict()
    del state["param_groups"][0]["impl"]
    opt2 = APOLLO([w])
    opt2.load_state_dict(state)
    assert opt2.param_groups[0]["impl"] == "auto"


def test_phases_compose_to_apollo_update() -> None:
    from lightning_opt.optim.apollo import apollo_apply_, apollo_direction, apollo_update_

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(12, 8, generator=g, dtype=torch.float64)
    proj = random_projection((12, 8), 3, 5, dtype=torch.float64)
    kw = {"beta1": 0.9, "beta2": 0.99, "eps": 1e-6, "scale": 2.0, "scale_type": "channel"}
    for convention in ("paper", "reference"):
        a, b = w0.clone(), w0.clone()
        ma, va = torch.zeros(12, 3, dtype=torch.float64), torch.zeros(12, 3, dtype=torch.float64)
        mb, vb = ma.clone(), va.clone()
        na = nb = None
        for step in range(1, 4):
            grad = torch.randn(12, 8, generator=g, dtype=torch.float64)
            na = apollo_update_(
                a, grad, ma, va, proj, step=step, lr=0.1, weight_decay=0.1, prev_norm=na, convention=convention, **kw
            )
            update, nb = apollo_direction(grad, mb, vb, proj, step=step, prev_norm=nb, convention=convention, **kw)
            apollo_apply_(b, update, step=step, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.1, convention=convention)
        assert torch.equal(a, b) and torch.equal(ma, mb) and torch.equal(na, nb)
