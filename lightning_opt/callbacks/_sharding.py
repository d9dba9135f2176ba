"""What the callbacks must do for FSDP2-sharded models (shared by every callback that needs it)."""

from __future__ import annotations

from torch import nn

__all__ = ["reshard_fsdp"]


def reshard_fsdp(module: nn.Module | None) -> None:
    """Drop FSDP2's gathered (unsharded) parameters after the sharded ones changed in place.

    A root ``fully_shard`` module keeps its parameters gathered after a forward without backward
    (validation), and its next forward reuses them. A callback that writes the parameters between
    such a forward and the next training step (schedule-free's train/eval switch, a rollback) must
    reshard, or the next forward computes with the old values. A no-op on modules without FSDP2.
    """
    if module is None:
        return
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
