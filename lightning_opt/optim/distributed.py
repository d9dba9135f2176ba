"""Owner-compute: the whole-matrix phase of matrix optimizers on FSDP2 shards and DDP replicas.

Infrastructure shared by :mod:`~lightning_opt.optim.muon`, :mod:`~lightning_opt.optim.soap` and
:mod:`~lightning_opt.optim.apollo` (registers nothing). Their steps are three phases: elementwise
work on a shard (momentum), a *direction* phase that needs the whole matrix (Newton-Schulz, the
eigenbasis rotation, the low-rank projection), and an elementwise apply. Only the middle phase
needs the whole matrix, and only on one rank:

1. **Assignment** (:func:`assign_owners`): every matrix gets one owning rank. Matrices are bucketed
   by shape (same shape, same cost); buckets are taken by descending cost, and each matrix of a
   bucket goes to the rank with the least work so far (ties: the lowest rank). This is
   longest-processing-time-first scheduling with the load carried across buckets, so the small
   buckets fill the gaps the large ones leave; the largest rank's work stays within one matrix of
   the mean. The assignment depends only on the shapes, the costs and the world size, so every
   rank computes the same one without communicating.
2. **Exchange** (FSDP2, :func:`owner_compute`): each rank packs the rows it holds of every matrix
   into one buffer, ordered by owner, and one ``all_to_all_single`` with split sizes (per dtype,
   per step) sends them; the owner concatenates the rows of its matrices, runs the optimizer's own
   direction function on the whole matrix, and a second ``all_to_all_single`` sends each rank its
   rows of the result. Per rank this moves ``(W-1)/W`` of its shard of every matrix owned
   elsewhere, out and back: about ``2 (W-1) P / W^2`` elements for ``P`` matrix elements in all,
   where gathering every parameter everywhere would move ``(W-1) P / W`` in. Nothing is
   all-gathered.
3. **DDP** (plain tensors, a process group with more than one rank): gradients are already whole
   and identical, so each rank runs the direction of the matrices it owns and broadcasts the
   results (one packed ``broadcast`` per owner and dtype); the replicas stay identical and each
   rank does about ``1/W`` of the matrix work.

Single process, or ``distributed="local"``: nothing here runs; the optimizers take their usual path.

Users: Muon (no owner state: its momentum is elementwise and stays with the rows), SOAP (unrotated
tensors stay local), APOLLO / APOLLO-Mini, Shampoo. AdaLomo does not need it: its factored
statistics are sums over rows or columns, so on shards it runs on local sums plus two coalesced
all-reduces (:func:`lightning_opt.optim.adalomo.adalomo_sharded_`), moving ``O(rows + cols)`` per
matrix instead of the matrix; under DDP every rank runs its (cheap, elementwise) step.

State that lives with a whole matrix (SOAP's preconditioners, eigenbases and rotated moments;
APOLLO's projection and low-rank moments) lives on the owner only. For checkpoints
(:func:`install_owner_state_hooks`) ``state_dict()`` turns every such tensor into a portable form:
under FSDP2 a ``DTensor`` sharded by rows like the parameter (``Shard(0)``: one ``all_to_all_single``
scatters the owner's rows), under DDP a plain tensor replicated on every rank (broadcast from the
owner), and 0-dim tensors are replicated in both. So every rank's state dict has every key of every
parameter, no rank-private tensor is ever presented as replicated, and
``torch.distributed.checkpoint`` can reshard it onto another world size. ``load_state_dict()``
gathers the rows back to the (possibly new) owner. With owner-held state both are collectives: call
them on every rank (Lightning's strategies and ``torch.distributed.checkpoint`` do).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_opt.optim.precision import is_dtensor, local

__all__ = [
    "Distributed",
    "MatrixJob",
    "OwnerStateEntry",
    "Topology",
    "assign_owners",
    "broadcast_from_owners",
    "cached_owners",
    "check_distributed",
    "check_shardable",
    "comm_debug_mode",
    "gather_rows",
    "install_owner_state_hooks",
    "load_balance",
    "local",
    "owner_compute",
    "scatter_rows",
    "shard_rows",
    "topology",
]

#: ``distributed`` option of the matrix optimizers: ``"auto"`` shares the matrix work when the
#: parameters are FSDP2 shards or a process group of more than one rank exists (DDP replicas);
#: ``"local"``: every process steps its own tensors as if alone (refused for DTensor shards)
Distributed = Literal["auto", "local"]
Mode = Literal["single", "fsdp", "ddp"]
#: the full shape of an owner-held state tensor, or of each entry of a list-valued key (``None``: no tensor)
Layout = tuple[int, ...] | list[tuple[int, ...] | None]


def check_distributed(cls: str, value: Any) -> str:
    """``value`` if it is a valid ``distributed`` option, else ``ValueError`` naming ``cls``."""
    if not isinstance(value, str) or value not in get_args(Distributed):
        raise ValueError(f"{cls}(distributed={value!r}) is invalid; expected one of {get_args(Distributed)}")
    return value


def check_shardable(cls: str, param: Tensor, name: str | None = None, *, distributed: str = "auto") -> None:
    """Refuse a DTensor the owner-compute scheme cannot step, at construction.

    Supported: FSDP2's layout, a 1-D device mesh with ``Shard(0)`` placement (uneven and empty
    shards included). Plain tensors always pass.

    Raises:
        NotImplementedError: another placement (tensor parallelism, HSDP's 2-D mesh), or a 0-dim DTensor.
        ValueError: a DTensor with ``distributed="local"`` (a shard's matrix math would be wrong).
    """
    if not is_dtensor(param):
        return
    from torch.distributed.tensor import Shard

    where = f" {name!r}" if name else ""
    if distributed == "local":
        raise ValueError(
            f"{cls}(distributed='local') got a DTensor (sharded) parameter{where}; its matrix math needs the whole "
            "matrix. Use distributed='auto' (the owner-compute scheme)."
        )
    placements = tuple(param.placements)
    if param.device_mesh.ndim != 1 or placements != (Shard(0),) or param.ndim == 0:
        raise NotImplementedError(
            f"{cls} got a DTensor parameter{where} with placements {placements} on a {param.device_mesh.ndim}-D "
            "mesh; the owner-compute scheme supports FSDP2's layout (fully_shard: Shard(0) on a 1-D mesh). "
            "Tensor parallelism and HSDP meshes are not supported; shard with fully_shard on a 1-D mesh."
        )


def shard_rows(rows: int, world: int) -> list[int]:
    """How many rows each rank holds of a ``Shard(0)`` tensor with ``rows`` rows (DTensor's chunk rule).

    ``ceil(rows / world)`` per rank in rank order, the last ranks fewer or none: 7 rows on 2 ranks
    are ``[4, 3]``, 1 row is ``[1, 0]``, 5 rows on 4 ranks are ``[2, 2, 1, 0]``.
    """
    size = -(-rows // world) if rows else 0
    return [max(0, min(size, rows - r * size)) for r in range(world)]


@dataclass(frozen=True)
class Topology:
    """Where a step runs: ``mode`` (``"single"``, ``"fsdp"``, ``"ddp"``), the process group, its size and our rank."""

    mode: Mode
    group: Any = None
    world: int = 1
    rank: int = 0
    mesh: Any = None


_SINGLE = Topology("single")


def topology(params: Sequence[Tensor], distributed: str = "auto") -> Topology:
    """The :class:`Topology` of a step over ``params`` (the matrices of the owner-compute path).

    ``"fsdp"`` if any is a DTensor (all must share one mesh); else ``"ddp"`` if ``distributed`` is
    ``"auto"`` and an initialized process group has more than one rank; else ``"single"``.

    Raises:
        NotImplementedError: DTensor parameters on different meshes.
    """
    # fully_shard builds a mesh object per call: equal meshes (same ranks, device type) are one
    meshes = {
        (p.device_mesh.device_type, tuple(p.device_mesh.mesh.flatten().tolist())): p.device_mesh
        for p in params
        if is_dtensor(p)
    }
    if meshes:
        if len(meshes) > 1:
            raise NotImplementedError(
                "the owner-compute scheme needs every sharded matrix on one device mesh; got "
                f"{len(meshes)} meshes (fully_shard all blocks with the same mesh)"
            )
        (mesh,) = meshes.values()
        group = mesh.get_group()
        import torch.distributed as dist

        return Topology("fsdp", group, dist.get_world_size(group), dist.get_rank(group), mesh)
    if distributed != "auto" or not torch.distributed.is_available():
        return _SINGLE
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return _SINGLE
    return Topology("ddp", dist.group.WORLD, dist.get_world_size(), dist.get_rank())


def assign_owners(
    costs: Sequence[float],
    keys: Sequence[Hashable] | None = None,
    world: int = 1,
    loads: Sequence[float] | None = None,
) -> tuple[list[int], list[float]]:
    """Give each matrix an owning rank: longest-processing-time first, load carried across buckets.

    Args:
        costs: each matrix's work (e.g. :func:`~lightning_opt.optim.muon.newton_schulz_flops`).
        keys: each matrix's bucket (its shape); ``None``: one bucket per distinct cost.
        world: the number of ranks.
        loads: the ranks' work before these matrices (default all 0), e.g. another optimizer's.

    Buckets are taken by their largest cost, descending (ties: first appearance); within a bucket
    matrices by cost, descending (ties: their order); each goes to the least-loaded rank (ties: the
    lowest rank). Deterministic: the same inputs give the same owners on every rank.

    Returns:
        The owner of each matrix, and the ranks' loads afterwards.
    """
    if world < 1:
        raise ValueError(f"assign_owners(world={world!r}) is invalid; it must be >= 1")
    keys = list(costs) if keys is None else list(keys)
    if len(keys) != len(costs):
        raise ValueError(f"assign_owners: {len(costs)} costs but {len(keys)} keys")
    start = [0.0] * world if loads is None else [float(x) for x in loads]
    if len(start) != world:
        raise ValueError(f"assign_owners: {len(start)} loads for world={world}")
    buckets: dict[Hashable, list[int]] = {}
    for i, k in enumerate(keys):
        buckets.setdefault(k, []).append(i)
    order = sorted(buckets.values(), key=lambda idx: (-max(costs[i] for i in idx), idx[0]))
    heap = [(load, r) for r, load in enumerate(start)]
    heapq.heapify(heap)
    owners = [0] * len(costs)
    for idx in order:
        for i in sorted(idx, key=lambda i: (-costs[i], i)):
            load, r = heapq.heappop(heap)
            owners[i] = r
            heapq.heappush(heap, (load + float(costs[i]), r))
    final = [0.0] * world
    for load, r in heap:
        final[r] = load
    return owners, final


def cached_owners(opt: Optimizer, topo: Topology, items: Sequence[tuple[Tensor, Hashable, float]]) -> dict[int, int]:
    """The owners (``id(param) -> rank``) of ``(param, bucket, cost)`` items, cached on ``opt``.

    For optimizers whose state lives on the owner: ``items`` must list every matrix (with a
    gradient this step or not), so the owners stay put while the parameters, their costs and the
    world size do; any change recomputes them (:func:`assign_owners`).
    """
    key = (topo.world, tuple((id(p), k, c) for p, k, c in items))
    cached = opt.__dict__.get("_owner_cache")
    if cached is None or cached[0] != key:
        owners, _ = assign_owners([c for *_, c in items], [k for _, k, _ in items], topo.world)
        cached = (key, {id(p): o for (p, _, _), o in zip(items, owners)})
        opt.__dict__["_owner_cache"] = cached
    return cached[1]


def load_balance(owners: Sequence[int], costs: Sequence[float], world: int) -> float:
    """The largest rank's work over the mean (1.0: perfectly balanced)."""
    loads = [0.0] * world
    for r, c in zip(owners, costs):
        loads[r] += float(c)
    mean = sum(loads) / world
    return max(loads) / mean if mean else 1.0


# --- the exchanges: each packs its tensors by (dtype, device) into one collective ---------------------


def _groups(items: Sequence[Any], dtype_device: Callable[[Any], tuple[torch.dtype, torch.device]]) -> dict:
    by: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, item in enumerate(items):
        by.setdefault(dtype_device(item), []).append(i)
    return by


def _trail(shape: Sequence[int]) -> int:
    return math.prod(shape[1:])


def _all_to_all(
    topo: Topology, send_parts: list[list[Tensor]], recv_sizes: list[int], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """One packed ``all_to_all_single``: ``send_parts[r]`` (flat tensors) go to rank ``r``; returns
    the flat receive buffer, ``recv_sizes[r]`` elements from each rank ``r`` in rank order."""
    import torch.distributed as dist

    send_sizes = [sum(t.numel() for t in parts) for parts in send_parts]
    flat = [t for parts in send_parts for t in parts]
    send = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
    recv = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
    dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=topo.group)
    return recv


def gather_rows(topo: Topology, items: Sequence[tuple[int, Tensor, tuple[int, ...]]]) -> list[Tensor | None]:
    """Send the rows of each ``(owner, local_rows, full_shape)`` to its owner (FSDP2 layout).

    ``local_rows`` is this rank's ``Shard(0)`` piece (``shard_rows(full_shape[0], W)[rank]`` rows).
    One ``all_to_all_single`` per (dtype, device). Returns the full tensor on the owner, ``None`` elsewhere.
    """
    out: list[Tensor | None] = [None] * len(items)
    W, me = topo.world, topo.rank
    for (dtype, device), idx in _groups(items, lambda it: (it[1].dtype, it[1].device)).items():
        send_parts: list[list[Tensor]] = [[] for _ in range(W)]
        recv_sizes = [0] * W
        mine = []
        for i in idx:
            owner, rows, shape = items[i]
            counts = shard_rows(shape[0], W)
            if tuple(rows.shape) != (counts[me], *shape[1:]):
                raise RuntimeError(
                    f"owner-compute: a shard of shape {tuple(rows.shape)} does not follow the Shard(0) chunk rule "
                    f"for {tuple(shape)} on {W} ranks (expected {counts[me]} rows)"
                )
            send_parts[owner].append(rows.reshape(-1))
            if owner == me:
                mine.append(i)
                for src in range(W):
                    recv_sizes[src] += counts[src] * _trail(shape)
        recv = _all_to_all(topo, send_parts, recv_sizes, dtype, device)
        # recv: for each source rank, the rows it holds of each of my matrices, in item order
        pieces: dict[int, list[Tensor]] = {i: [] for i in mine}
        offset = 0
        for src in range(W):
            for i in mine:
                shape = items[i][2]
                n = shard_rows(shape[0], W)[src] * _trail(shape)
                pieces[i].append(recv[offset : offset + n].view(-1, *shape[1:]))
                offset += n
        for i in mine:
            out[i] = torch.cat(pieces[i]).view(items[i][2])
    return out


def scatter_rows(
    topo: Topology,
    items: Sequence[tuple[int, Tensor | None, tuple[int, ...], torch.dtype, torch.device]],
) -> list[Tensor]:
    """Send each rank its rows of each ``(owner, full_or_None, full_shape, dtype, device)`` (FSDP2 layout).

    The owner holds the full tensor (``None`` elsewhere). One ``all_to_all_single`` per (dtype,
    device). Returns this rank's ``Shard(0)`` piece of every tensor (new, contiguous).
    """
    out: list[Tensor] = [None] * len(items)  # type: ignore[list-item]
    W, me = topo.world, topo.rank
    for (dtype, device), idx in _groups(items, lambda it: (it[3], it[4])).items():
        send_parts: list[list[Tensor]] = [[] for _ in range(W)]
        recv_sizes = [0] * W
        for i in idx:
            owner, full, shape = items[i][:3]
            counts = shard_rows(shape[0], W)
            if owner == me:
                if full is None or tuple(full.shape) != tuple(shape):
                    got = None if full is None else tuple(full.shape)
                    raise RuntimeError(f"owner-compute: the owner's result has shape {got}, expected {tuple(shape)}")
                flat = full.to(dtype).reshape(shape[0], -1)
                start = 0
                for dst in range(W):
                    send_parts[dst].append(flat[start : start + counts[dst]].reshape(-1))
                    start += counts[dst]
            recv_sizes[owner] += counts[me] * _trail(shape)
        recv = _all_to_all(topo, send_parts, recv_sizes, dtype, device)
        # recv: for each owner rank, my rows of each of its tensors, in item order
        offsets = [0] * W
        for r in range(1, W):
            offsets[r] = offsets[r - 1] + recv_sizes[r - 1]
        for i in idx:
            owner, _, shape = items[i][:3]
            n = shard_rows(shape[0], W)[me] * _trail(shape)
            out[i] = recv[offsets[owner] : offsets[owner] + n].view(-1, *shape[1:])
            offsets[owner] += n
    return out


def broadcast_from_owners(
    topo: Topology,
    items: Sequence[tuple[int, Tensor | None, tuple[int, ...], torch.dtype, torch.device]],
) -> list[Tensor]:
    """Give every rank the full ``(owner, full_or_None, shape, dtype, device)`` tensors (DDP layout).

    One packed ``broadcast`` per owner rank and (dtype, device). Returns the full tensors on every rank.
    """
    import torch.distributed as dist

    out: list[Tensor] = [None] * len(items)  # type: ignore[list-item]
    for (dtype, device), idx in _groups(items, lambda it: (it[3], it[4])).items():
        for owner in range(topo.world):
            owned = [i for i in idx if items[i][0] == owner]
            if not owned:
                continue
            sizes = [math.prod(items[i][2]) for i in owned]
            if owner == topo.rank:
                for i in owned:
                    full = items[i][1]
                    if full is None or tuple(full.shape) != tuple(items[i][2]):
                        got = None if full is None else tuple(full.shape)
                        raise RuntimeError(
                            f"owner-compute: the owner's result has shape {got}, expected {tuple(items[i][2])}"
                        )
                buf = torch.cat([items[i][1].to(dtype).reshape(-1) for i in owned])
            else:
                buf = torch.empty(sum(sizes), dtype=dtype, device=device)
            # the global rank of the group's `owner`
            src = dist.get_global_rank(topo.group, owner) if topo.group is not dist.group.WORLD else owner
            dist.broadcast(buf, src=src, group=topo.group)
            for i, part in zip(owned, buf.split(sizes)):
                out[i] = part.view(items[i][2])
    return out


# --- the owner-compute step ---------------------------------------------------------------------------


@dataclass
class MatrixJob:
    """One matrix's direction phase.

    Args:
        owner: the rank that runs ``compute`` (from :func:`assign_owners`).
        inputs: tensors whose dim 0 is the matrix's rows, in one dtype: this rank's rows under FSDP2,
            the whole tensors under DDP or on one process.
        rows: the matrix's global number of rows.
        outputs: the full shapes ``compute`` returns (dim 0: the rows); may be empty.
        compute: the optimizer's own function: full inputs -> full outputs (runs on the owner only).
    """

    owner: int
    inputs: list[Tensor]
    rows: int
    outputs: list[tuple[int, ...]]
    compute: Callable[[list[Tensor]], list[Tensor]]


def owner_compute(topo: Topology, jobs: Sequence[MatrixJob]) -> list[list[Tensor]]:
    """Run every job's ``compute`` on its owner; return each job's outputs as this rank needs them.

    ``"fsdp"``: inputs gathered to the owner by rows (:func:`gather_rows`), outputs sent back by
    rows (:func:`scatter_rows`): this rank's rows of every output. ``"ddp"``: the owner computes
    on its full inputs and broadcasts (:func:`broadcast_from_owners`): full outputs everywhere.
    ``"single"``: every job computed here.
    """
    if topo.mode == "single":
        return [list(job.compute(job.inputs)) for job in jobs]
    results: list[list[Tensor]] = [[] for _ in jobs]
    if topo.mode == "fsdp":
        flat = [(j, x) for j, job in enumerate(jobs) for x in job.inputs]
        full = gather_rows(topo, [(jobs[j].owner, x, (jobs[j].rows, *x.shape[1:])) for j, x in flat])
        per_job: list[list[Tensor]] = [[] for _ in jobs]
        for (j, _), f in zip(flat, full):
            if f is not None:
                per_job[j].append(f)
        computed = {j: job.compute(per_job[j]) for j, job in enumerate(jobs) if job.owner == topo.rank}
        spread = scatter_rows
    else:
        computed = {j: job.compute(job.inputs) for j, job in enumerate(jobs) if job.owner == topo.rank}
        spread = broadcast_from_owners
    items, where = [], []
    for j, job in enumerate(jobs):
        sample = job.inputs[0]
        mine = computed.get(j)
        if mine is not None and len(mine) != len(job.outputs):
            raise RuntimeError(f"owner-compute: a job returned {len(mine)} outputs, expected {len(job.outputs)}")
        for k, shape in enumerate(job.outputs):
            items.append((job.owner, None if mine is None else mine[k], tuple(shape), sample.dtype, sample.device))
            where.append(j)
    for j, t in zip(where, spread(topo, items)):
        results[j].append(t)
    return results


# --- measuring what a step moves ---------------------------------------------------------------------


def comm_debug_mode() -> Any:
    """A ``torch.distributed.tensor.debug.CommDebugMode`` that also counts the bytes of each collective.

    ``mode.get_comm_counts()`` as torch's; ``mode.comm_bytes``: ``{op name: {"sent": bytes,
    "received": bytes}}`` for this rank, counting only what crosses to or from other ranks
    (``all_to_all``: the splits of the other ranks; ``broadcast``: the root sends, the others
    receive; ``all_reduce``/``all_gather``: the tensors' bytes both ways).

    Example:
        >>> with comm_debug_mode() as mode:
        ...     opt.step()
        >>> mode.comm_bytes["c10d.alltoall_base_"]["sent"]
    """
    from torch.distributed.tensor.debug import CommDebugMode

    class _CommBytes(CommDebugMode):
        def __init__(self) -> None:
            super().__init__()
            self.comm_bytes: dict[str, dict[str, int]] = {}

        def _record(self, name: str, sent: int, received: int) -> None:
            rec = self.comm_bytes.setdefault(name, {"sent": 0, "received": 0})
            rec["sent"] += sent
            rec["received"] += received

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(getattr(func, "_overloadpacket", func))
            plain = not any(getattr(t, "__name__", "") == "DTensor" for t in types)
            if plain and name.startswith(("c10d.", "_c10d_functional.", "c10d_functional.")):
                self._count(name, args)
            return super().__torch_dispatch__(func, types, args, kwargs)

        def _count(self, name: str, args: tuple[Any, ...]) -> None:
            from torch._C._distributed_c10d import ProcessGroup

            def pg(x: Any) -> Any:  # the dispatcher hands the group over as a ScriptObject
                return x if isinstance(x, ProcessGroup) else ProcessGroup.unbox(x)

            def nbytes(x: Any) -> int:
                if isinstance(x, Tensor):
                    return x.numel() * x.element_size()
                if isinstance(x, (list, tuple)):
                    return sum(nbytes(y) for y in x)
                return 0

            if name == "c10d.alltoall_base_":
                out, inp, group, out_splits, in_splits = args[:5]
                group = pg(group)
                rank, world = group.rank(), group.size()
                esize = inp.element_size()
                ins = list(in_splits) or [inp.numel() // world] * world
                outs = list(out_splits) or [out.numel() // world] * world
                self._record(name, (sum(ins) - ins[rank]) * esize, (sum(outs) - outs[rank]) * esize)
            elif name == "c10d.broadcast_":
                tensors, group, root = args[0], pg(args[1]), args[2]
                size = nbytes(tensors)
                self._record(name, size if group.rank() == root else 0, 0 if group.rank() == root else size)
            else:
                size = nbytes(args[0])
                self._record(name, size, size)

    return _CommBytes()


# --- owner-held state in checkpoints ------------------------------------------------------------------


@dataclass
class OwnerStateEntry:
    """A parameter's owner-held state: ``layout`` gives each key's full shape (see :data:`Layout`)."""

    param: Tensor
    owner: int
    layout: dict[str, Layout]
    dtype: torch.dtype
    device: torch.device


def install_owner_state_hooks(opt: Optimizer, entries: Callable[[], tuple[Topology, list[OwnerStateEntry]]]) -> None:
    """Make the owner-held state of ``opt`` portable through ``state_dict`` / ``load_state_dict``.

    ``entries()`` returns the topology and, for every parameter whose whole-matrix state lives on
    one owner, the owner and the keys' full shapes (so the other ranks can receive them). See the
    module docstring for the portable forms. Single process: the hooks do nothing.
    """

    def state_dict_hook(_opt: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any] | None:
        topo, todo = entries()
        if topo.mode == "single" or not todo:
            return None
        index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
        rows_items, bcast_items, places = [], [], []
        for e in todo:
            live = opt.state[e.param]
            for key, layout in e.layout.items():
                shapes = layout if isinstance(layout, list) else [layout]
                value = live.get(key) if e.owner == topo.rank else None
                values = value if isinstance(layout, list) else [value]
                for k, shape in enumerate(shapes):
                    if shape is None:
                        continue
                    full = None if values is None else values[k]
                    item = (e.owner, full, tuple(shape), e.dtype, e.device)
                    if topo.mode == "fsdp" and len(shape) > 0:
                        places.append(("rows", len(rows_items), e, key, k))
                        rows_items.append(item)
                    else:
                        places.append(("bcast", len(bcast_items), e, key, k))
                        bcast_items.append(item)
        rows = scatter_rows(topo, rows_items) if rows_items else []
        bcast = broadcast_from_owners(topo, bcast_items) if bcast_items else []
        new_state = dict(state_dict["state"])
        edited: dict[int, dict[str, Any]] = {}
        for kind, pos, e, key, k in places:
            i = index[id(e.param)]
            if i not in edited:
                edited[i] = dict(new_state.get(i, {}))
                for key2, layout in e.layout.items():  # every key present, list keys as fresh lists
                    edited[i][key2] = [None] * len(layout) if isinstance(layout, list) else None
            if kind == "rows":
                from torch.distributed.tensor import DTensor, Shard

                shape = rows_items[pos][2]
                value = DTensor.from_local(
                    rows[pos],
                    topo.mesh,
                    [Shard(0)],
                    run_check=False,
                    shape=torch.Size(shape),
                    stride=torch.empty(shape, device="meta").stride(),
                )
            else:
                value = bcast[pos]
            if isinstance(e.layout[key], list):
                edited[i][key][k] = value
            else:
                edited[i][key] = value
        # one key order on every rank (the owner created its keys in another order than the others
        # fill them in): a full state dict gathers the DTensors in iteration order, collective by
        # collective, and ranks walking different orders deadlock gloo / abort
        new_state.update({i: dict(sorted(entry.items())) for i, entry in edited.items()})
        return {**state_dict, "state": new_state}

    def load_hook(_opt: Optimizer) -> None:
        topo, todo = entries()
        if topo.mode == "single" or not todo:
            return
        items, places = [], []
        for e in todo:
            state = opt.state[e.param]
            for key, layout in e.layout.items():
                if key not in state:
                    raise KeyError(f"{type(opt).__name__}.load_state_dict: the state of a matrix lacks {key!r}")
                is_list = isinstance(layout, list)
                values = state[key] if is_list else [state[key]]
                kept: list[Any] = []
                for k, v in enumerate(values):
                    if v is None:
                        kept.append(None)
                    elif is_dtensor(v) and v.placements and v.placements[0].is_shard():
                        places.append((e, key, k, is_list))
                        items.append((e.owner, v.to_local().to(e.dtype), tuple(v.shape)))
                        kept.append(None)
                    else:  # replicated: the whole tensor is here
                        kept.append(local(v).to(e.dtype).clone(memory_format=torch.contiguous_format))
                if e.owner == topo.rank:
                    state[key] = kept if is_list else kept[0]
                else:
                    del state[key]
        full = gather_rows(topo, items) if items else []
        for (e, key, k, is_list), f in zip(places, full):
            if e.owner != topo.rank:
                continue
            if is_list:
                opt.state[e.param][key][k] = f
            else:
                opt.state[e.param][key] = f

    opt.register_state_dict_post_hook(state_dict_hook)
    opt.register_load_state_dict_post_hook(load_hook)
