"""Hugging Face TrainingArguments: the optimizer and lr schedule equal what transformers' Trainer builds."""

from __future__ import annotations

import dataclasses
import types
import warnings

import pytest
import torch
from torch import nn

from lightning_opt import from_hf_training_args, hf_lr_schedule
from lightning_opt.hf import HF_DEFAULTS, hf_decay_parameter_names, hf_optimizer_names
from lightning_opt.optim.registry import resolve
from lightning_opt.schedules import plateau_init, plateau_update

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402
from transformers.training_args import OptimizerNames  # noqa: E402

STEPS = 10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is fastest (and does not spin against other test processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Net(nn.Module):
    """An embedding and a linear layer of 4096 elements (8-bit sized), a LayerNorm, biases, a ``*_norm`` gain."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(512, 8)
        self.fc1 = nn.Linear(8, 512)
        self.ln = nn.LayerNorm(512)
        self.fc2 = nn.Linear(512, 4)
        self.out_norm = nn.Parameter(torch.ones(4))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ln(torch.tanh(self.fc1(self.emb(idx))))) * self.out_norm


def _args(tmp_path, **kw) -> TrainingArguments:
    base = {"learning_rate": 1e-3, "weight_decay": 0.1, "adam_beta1": 0.8, "adam_beta2": 0.95, "adam_epsilon": 1e-6}
    return TrainingArguments(output_dir=str(tmp_path), report_to="none", **{**base, **kw})


def _hf_optimizer(args: TrainingArguments, model: nn.Module) -> torch.optim.Optimizer:
    """transformers' own Trainer.create_optimizer on a stand-in Trainer (no data, no accelerator set-up)."""
    stub = types.SimpleNamespace(model=model, optimizer=None, args=args, optimizer_cls_and_kwargs=None)
    stub.get_decay_parameter_names = types.MethodType(Trainer.get_decay_parameter_names, stub)
    stub.get_optimizer_cls_and_kwargs = Trainer.get_optimizer_cls_and_kwargs
    return Trainer.create_optimizer(stub)


# per HF name: TrainingArguments beyond the common ones, chosen to exercise optim_args
EXTRA = {
    "sgd": {"learning_rate": 1e-2, "optim_args": "momentum=0.9,nesterov=True"},
    "rmsprop": {"optim_args": "momentum=0.5,centered=True,alpha=0.9"},
    "adagrad": {"learning_rate": 1e-2, "optim_args": "lr_decay=0.01"},
    "adafactor": {"learning_rate": 1e-2},
    "apollo_adamw": {"optim_target_modules": ["fc1"], "optim_args": "rank=2,update_proj_gap=4,scale=2.0", "learning_rate": 1e-2},
    "schedule_free_adamw": {"warmup_steps": 3, "optim_args": "r=0.5"},
    "schedule_free_sgd": {"warmup_steps": 3, "learning_rate": 1e-1},
    "schedule_free_radam": {"optim_args": "weight_lr_power=1.0"},
    "grokadamw": {"optim_args": "gamma=0.2,lamb=1.5"},
    "lomo": {"weight_decay": 0.0},
    "adalomo": {"weight_decay": 0.0},
}
def _resolves(name: str) -> bool:
    try:
        resolve(name)
    except ValueError:
        return False
    return True


RESOLVED = [o.value for o in OptimizerNames if _resolves(o.value)]


def test_every_hf_name_the_registry_resolves_is_built() -> None:
    assert RESOLVED, "no Hugging Face optim name resolves"
    assert sorted(RESOLVED) == hf_optimizer_names()


def _train(model: nn.Module, opt: torch.optim.Optimizer, name: str, lr: float) -> None:
    if hasattr(opt, "train"):
        opt.train()  # schedule-free: the Trainer switches to training mode too
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        idx = torch.randint(0, 512, (8,), generator=g)
        target = torch.randn(8, 4, generator=g)
        loss = (model(idx) - target).pow(2).mean()
        if name in ("lomo", "adalomo") and type(opt).__module__.startswith("lomo_optim"):
            opt.fused_backward(loss, lr)  # transformers' Trainer calls this for LOMO
        else:
            opt.zero_grad()
            loss.backward()
            opt.step()


@pytest.mark.parametrize("name", RESOLVED)
def test_optimizer_equals_hf_trainer_step_for_step(name: str, tmp_path) -> None:
    args = _args(tmp_path, optim=name, **EXTRA.get(name, {}))
    hf_model, our_model = Net(), Net()
    try:
        ref = _hf_optimizer(args, hf_model)
    except (ImportError, ValueError, RuntimeError, AssertionError) as err:  # lomo_optim.AdaLomo allocates on CUDA
        pytest.skip(f"transformers cannot build {name} here: {err}")
    try:
        ours = from_hf_training_args(args, our_model)
    except RuntimeError as err:  # a bitsandbytes optimizer that cannot run on this device (paged: CUDA)
        pytest.skip(f"{name}: {err}")
    # the same parameter groups: each parameter's weight decay and lr
    hf_wd = {id(p): (g.get("weight_decay", 0.0), g["lr"]) for g in ref.param_groups for p in g["params"]}
    our_wd = {id(p): (g.get("weight_decay", 0.0), g["lr"]) for g in ours.param_groups for p in g["params"]}
    hf_names = {n: hf_wd[id(p)] for n, p in hf_model.named_parameters()}
    assert {n: our_wd[id(p)] for n, p in our_model.named_parameters()} == hf_names
    try:
        _train(hf_model, ref, name, args.learning_rate)
    except RuntimeError as err:
        pytest.skip(f"transformers' {name} does not step on this machine: {err}")
    _train(our_model, ours, name, args.learning_rate)
    for (n, a), b in zip(our_model.named_parameters(), hf_model.parameters()):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name} {n}: {m}")


def test_8bit_embedding_state_stays_32bit(tmp_path) -> None:
    pytest.importorskip("bitsandbytes")
    model = Net()
    try:
        opt = from_hf_training_args(_args(tmp_path, optim="adamw_8bit"), model)
    except RuntimeError as err:
        pytest.skip(str(err))
    _train(model, opt, "adamw_8bit", 1e-3)
    assert opt.state[model.emb.weight]["state1"].dtype == torch.float32
    assert opt.state[model.fc1.weight]["state1"].dtype == torch.uint8


def test_decay_names_equal_transformers_on_real_models() -> None:
    cfgs = [
        transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8),
        transformers.LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1, vocab_size=16),
    ]
    for cfg in cfgs:
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        stub = types.SimpleNamespace()
        ref = Trainer.get_decay_parameter_names(stub, model)
        assert hf_decay_parameter_names(model) == ref
        assert any("wte" in n or "embed_tokens" in n for n in ref)  # embeddings decay in HF
    assert hf_decay_parameter_names(Net()) == Trainer.get_decay_parameter_names(types.SimpleNamespace(), Net())


def test_mapping_of_fields_equals_training_arguments(tmp_path) -> None:
    fields = {"optim": "adamw_torch", "learning_rate": 1e-3, "weight_decay": 0.1, "adam_beta2": 0.95}
    a, b = Net(), Net()
    opt_a = from_hf_training_args(fields, a)
    opt_b = from_hf_training_args(TrainingArguments(output_dir=str(tmp_path), report_to="none", **fields), b)
    assert [(g["lr"], g["betas"], g["eps"], g["weight_decay"]) for g in opt_a.param_groups] == [
        (g["lr"], g["betas"], g["eps"], g["weight_decay"]) for g in opt_b.param_groups
    ]
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments) if f.name in HF_DEFAULTS}
    assert {k: getattr(v, "value", v) for k, v in defaults.items()} == HF_DEFAULTS


def test_bad_input_errors() -> None:
    with pytest.raises(ValueError, match="optim='adamw_torch_xla' has no lightning_opt counterpart.*adafactor"):
        from_hf_training_args({"optim": "adamw_torch_xla"}, Net())
    with pytest.raises(ValueError, match=r"optim_args \['betas'\] are not read"):
        from_hf_training_args({"optim": "adamw_torch", "optim_args": "betas=0.9"}, Net())
    with pytest.raises(ValueError, match="weight_decay for 'sgd' has no effect"):
        from_hf_training_args({"optim": "sgd", "optim_args": "weight_decay=0.1"}, Net())
    with pytest.raises(ValueError, match="not TrainingArguments fields"):
        from_hf_training_args({"optim": "adamw_torch", "learnig_rate": 1e-3}, Net())
    with pytest.raises(ValueError, match="optim_target_modules is not read"):
        from_hf_training_args({"optim": "adamw_torch", "optim_target_modules": ["fc1"]}, Net())
    with pytest.raises(ValueError, match="needs optim_target_modules"):
        from_hf_training_args({"optim": "apollo_adamw"}, Net())
    with pytest.warns(UserWarning, match="no weight_decay"):
        opt = from_hf_training_args({"optim": "lomo", "weight_decay": 0.1}, Net())
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0]
    with pytest.warns(UserWarning, match="ignores warmup_steps"):
        hf_lr_schedule({"lr_scheduler_type": "constant", "warmup_steps": 5}, total_steps=10)
    with pytest.raises(ValueError, match="cannot be expressed"):
        hf_lr_schedule({"lr_scheduler_type": "greedy"})
    with pytest.raises(ValueError, match="num_cycles"):
        hf_lr_schedule({"lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {"num_cycles": 1.0}}, total_steps=10)


T = 24
SCHEDULES = [
    ("linear", {}, 5),
    ("linear", {}, 0.25),
    ("linear", {}, 0),
    ("cosine", {}, 4),
    ("cosine", {"num_cycles": 0.5}, 0.1),
    ("cosine_with_restarts", {}, 4),
    ("cosine_with_restarts", {"num_cycles": 4}, 4),
    ("polynomial", {"power": 2.0, "lr_end": 1e-4}, 3),
    ("polynomial", {}, 0),
    ("constant", {}, 0),
    ("constant_with_warmup", {}, 6),
    ("inverse_sqrt", {}, 5),
    ("inverse_sqrt", {"timescale": 7}, 3),
    ("inverse_sqrt", {}, 0),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}, 4),
    ("cosine_with_min_lr", {"min_lr": 1e-4}, 0.2),
    ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.1}, 4),
    ("cosine_warmup_with_min_lr", {"min_lr": 2e-4}, 0),
    ("warmup_stable_decay", {"num_decay_steps": 6}, 4),
    ("warmup_stable_decay", {"num_decay_steps": 5, "decay_type": "1-sqrt", "min_lr_ratio": 0.1}, 3),
    ("warmup_stable_decay", {"num_decay_steps": 8, "decay_type": "linear", "num_stable_steps": 6, "min_lr_ratio": 0.2}, 4),
]


@pytest.mark.parametrize(("kind", "kwargs", "warmup"), SCHEDULES, ids=lambda x: str(x))
def test_lr_schedule_equals_hf_get_scheduler(kind: str, kwargs: dict, warmup: float, tmp_path) -> None:
    lr = 1e-3
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to="none", learning_rate=lr, lr_scheduler_type=kind,
        lr_scheduler_kwargs=kwargs, warmup_steps=warmup,
    )
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    ref = transformers.get_scheduler(
        kind, opt, num_warmup_steps=args.get_warmup_steps(T), num_training_steps=T, scheduler_specific_kwargs=kwargs
    )
    hf = []
    for _ in range(T):
        hf.append(opt.param_groups[0]["lr"] / lr)
        opt.step()
        ref.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        schedule = hf_lr_schedule(args, total_steps=T).config.resolve(T)
    ours = [schedule(t) for t in range(T)]
    assert ours == pytest.approx(hf, rel=1e-12, abs=1e-12)


def test_plateau_equals_torch_reduce_lr_on_plateau(tmp_path) -> None:
    lr = 1e-2
    kwargs = {"factor": 0.5, "patience": 1, "threshold": 0.01, "cooldown": 1, "min_lr": 1e-3}
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to="none", learning_rate=lr, lr_scheduler_type="reduce_lr_on_plateau",
        lr_scheduler_kwargs=kwargs, eval_strategy="steps",
    )
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    ref = transformers.get_scheduler("reduce_lr_on_plateau", opt, scheduler_specific_kwargs=kwargs)
    config = hf_lr_schedule(args).config
    state = plateau_init(config)
    for metric in [1.0, 0.9, 0.95, 0.97, 0.96, 0.99, 1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97]:
        ref.step(metric)
        state = plateau_update(config, state, metric)
        assert state["scale"] == pytest.approx(opt.param_groups[0]["lr"] / lr, rel=1e-12)
    assert state["scale"] == pytest.approx(0.1)  # reached min_lr
