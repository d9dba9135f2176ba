"""Write ``configs/<name>.yaml`` for every registered optimizer (run after registering a new one).

    python examples/make_configs.py

Each config trains the demo's tiny GPT with that optimizer at its registry default lr, with a
linear warmup + cosine LR schedule (LRSchedule logs every group's lr); edit ``optimizer`` and ``trainer`` to taste.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning_opt import available_optimizers, get_optimizer_info
from lightning_opt.optim.registry import accepted_hparams

TEMPLATE = """\
# {name}: {description}
# {paper}
# lightning-opt fit --config configs/{name}.yaml
seed_everything: 0
model:
  class_path: lightning_opt.demo.TinyGPT
  init_args:
    n_layer: 2
    n_embd: 64
    optimizer:
      name: {name}
      lr: {lr}
      weight_decay: {wd}
      hparams: {hparams}
data:
  class_path: lightning_opt.demo.CharDataModule
  init_args:
    batch_size: 32
trainer:
  accelerator: cpu
  max_steps: 1000
  val_check_interval: 250
  limit_val_batches: 8
  gradient_clip_val: 1.0
  callbacks:
    - class_path: lightning_opt.callbacks.LRSchedule
      init_args:
        shape: cosine
        warmup_ratio: 0.05
        min_lr_ratio: 0.1
"""


# settings that depend on this model and data, where an algorithm's defaults do not fit
HPARAMS = {
    # SophiaG's bs is the tokens per batch of the GNB estimate: batch_size 32 x block_size 64
    "sophia": "{bs: 2048}",
}


def render(name: str) -> str:
    info = get_optimizer_info(name)
    wd = 0.1 if "weight_decay" in accepted_hparams(info) else 0.0
    return TEMPLATE.format(name=name, description=info.description, paper=info.paper or "", lr=repr(float(info.default_lr)), wd=wd, hparams=HPARAMS.get(name, "{}"))


def main(out: Path = Path(__file__).resolve().parents[1] / "configs") -> None:
    out.mkdir(exist_ok=True)
    for name in available_optimizers():
        (out / f"{name}.yaml").write_text(render(name))
    print(f"wrote {len(available_optimizers())} configs to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
