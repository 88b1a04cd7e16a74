"""Data-parallel training with sharded embedding tables: TorchRec's DistributedModelParallel
under torchrun.

torchrun starts one process per rank and sets RANK / WORLD_SIZE; ``cluster_from_env`` joins
them (gloo; the ranks run on CPU). ``ShardedTwoTower`` hands the TwoTower to DMP: TorchRec's
planner places the embedding tables (table-wise, row-wise or column-wise), their optimizer runs
fused in the lookup's backward, and DMP's data-parallel wrapper replicates the dense layers and
all-reduces their gradients. The Trainer runs the same code on every rank, which keeps the
sharded lookups (collectives) in lockstep; evaluation, MLflow and the final model happen on
rank 0 from the gathered, unsharded weights.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..ops.errors import ConfigError
from ..ops.io import atomic_write

log = logging.getLogger(__name__)

OPTIMIZERS = {"adam": torch.optim.Adam, "sparse_adam": torch.optim.SparseAdam, "adagrad": torch.optim.Adagrad}


def table_optimizer_class(name: str):
    """The torch optimizer class of ``train.embedding_optimizer``; TorchRec maps each to its
    fused fbgemm kernel when the tables are sharded."""
    if name == "rowwise_adagrad":
        from torchrec.optim import RowWiseAdagrad

        return RowWiseAdagrad
    return OPTIMIZERS[name]


@dataclass(frozen=True)
class Cluster:
    """This process's place among the ranks torchrun started."""

    rank: int
    world: int
    device: torch.device

    @property
    def chief(self) -> bool:
        """Rank 0: the one that evaluates, logs to MLflow and saves the final model."""
        return self.rank == 0

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def max(self, value: int) -> int:
        t = torch.tensor([value], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)


# rank 0 evaluates and builds the ANN index while the others wait in a collective: allow for a
# long validation on a large catalog (gloo's default is 30 minutes)
TIMEOUT = datetime.timedelta(hours=4)


def cluster_from_env() -> Cluster | None:
    """The cluster torchrun describes in the environment, or None for a process not started by
    torchrun.

    The ranks train on CPU with gloo. The GPU placement of the batch (features, samplers, loss
    on the rank's device, nccl) is not built yet: on a CUDA host the ranks still run on CPU,
    and say so."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return None  # a plain process; under torchrun even one process shards (fused sparse table updates)
    if torch.cuda.is_available():
        log.warning("CUDA is available, but distributed training runs its ranks on CPU (gloo): GPU placement is not built yet")
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=TIMEOUT)
    # TorchRec 1.8's row-wise collectives call torch APIs that torch 2.13 marks deprecated; not ours to fix
    warnings.filterwarnings("ignore", r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
                            FutureWarning)
    return Cluster(dist.get_rank(), dist.get_world_size(), torch.device("cpu"))


class PeerFailures:
    """How rank 0 learns why the other ranks stopped. When a rank fails, torchrun stops the
    others with SIGTERM, and rank 0's run would end KILLED, as if a user had stopped it. A
    failing rank leaves its error in a file first; rank 0 reads it when it stops, and the run
    ends FAILED with that error. One folder per torchrun launch, under the checkpoint folder
    (which several hosts must share for resuming anyway)."""

    def __init__(self, checkpoint_dir: str | Path, name: str):
        self.folder = Path(checkpoint_dir) / name / "failures" / os.environ.get("TORCHELASTIC_RUN_ID", "local")
        self.since = time.time() - 60  # a launch that reuses a rendezvous id must not read older reports

    @contextlib.contextmanager
    def reported(self, rank: int):
        """Leave this rank's error behind if the block raises."""
        try:
            yield
        except Exception as e:
            text = f"rank {rank}: {type(e).__name__}: {e}"
            with contextlib.suppress(OSError):  # the error itself matters more than its report
                atomic_write(self.folder / f"rank{rank}.txt", lambda tmp: Path(tmp).write_text(text))
            raise

    def message(self) -> str | None:
        """The other ranks' errors in this launch, or None when none failed (or none can be read)."""
        try:
            reports = sorted(p for p in self.folder.glob("rank*.txt") if p.stat().st_mtime >= self.since)
            return "; ".join(p.read_text() for p in reports) or None
        except OSError:
            return None


SHARDED_DEVICE = "cpu"  # where the ranks of a launch shard their tables (cluster_from_env: gloo, CPU)


def embedding_optimizer_for(name: str, device_type: str | None) -> str:
    """``auto``: Adam in one process (``device_type`` None) and on sharded GPU tables, rowwise
    Adagrad on sharded CPU tables (fbgemm has no fused CPU Adam); any other name as given."""
    if name != "auto":
        return name
    return "rowwise_adagrad" if device_type == "cpu" else "adam"


def check_supported(embedding_optimizer: str, device_type: str | None) -> None:
    """Refuse, before any process or run starts, what the sharded tables cannot train with here
    (``device_type``: of the sharded tables; None: one process, anything goes)."""
    if device_type is not None and embedding_optimizer == "sparse_adam":
        raise ConfigError("train.embedding_optimizer: sparse_adam is the single-process lazy Adam; sharded tables train "
                          "with TorchRec's fused optimizers: adagrad or rowwise_adagrad (or auto)")
    if device_type == "cpu" and embedding_optimizer == "adam":
        raise ConfigError("train.embedding_optimizer: adam has no fused CPU kernel in fbgemm; sharded tables on CPU "
                          "train with adagrad or rowwise_adagrad (or auto)")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _sharder():
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.types import ShardingType

    class Sharder(EmbeddingBagCollectionSharder):
        """TorchRec 1.8 offers row-wise sharding only to GPUs, yet its CPU path (fbgemm's CPU
        kernels, gloo's all-to-all and reduce-scatter) runs it; the 2-process test trains with
        it. Batches must then be the same size on every rank, which the Trainer keeps."""

        def sharding_types(self, compute_device_type: str) -> list[str]:
            types = super().sharding_types(compute_device_type)
            return types + [ShardingType.ROW_WISE.value] if ShardingType.ROW_WISE.value not in types else types

    return Sharder()


class ShardedTwoTower:
    """A TwoTower inside DistributedModelParallel.

    ``module`` is the TwoTower itself, its EmbeddingBagCollection now sharded (its calls are
    collectives: every rank makes them, with batches of the same size); ``dmp`` is the wrapper
    whose forward all-reduces the dense gradients. The tables start from the model's own seeded
    weights, as in a single process (DMP would draw new ones)."""

    def __init__(self, model, cluster: Cluster, *, sharding: str = "auto", table_optimizer: str = "rowwise_adagrad", lr: float = 0.01):
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

        check_supported(table_optimizer, cluster.device.type)
        self.cluster = cluster
        seeded = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.unsharded = copy.deepcopy(model)  # filled by ``gather``: what evaluation and serving read
        apply_optimizer_in_backward(table_optimizer_class(table_optimizer), model.ebc.parameters(), {"lr": lr})
        tables = [t.name for t in model.ebc.embedding_bag_configs()]
        # auto: the planner chooses among the sharded layouts (its data_parallel choice for a small
        # table would hand that table to the dense optimizer instead of the configured one)
        kinds = ["table_wise", "row_wise", "column_wise"] if sharding == "auto" else [sharding]
        constraints = {t: ParameterConstraints(sharding_types=kinds) for t in tables}
        sharders = [_sharder()]
        with _quiet_torchrec():
            planner = EmbeddingShardingPlanner(topology=Topology(world_size=cluster.world, compute_device=cluster.device.type),
                                               constraints=constraints)
            self.plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
            self.dmp = DistributedModelParallel(model, device=cluster.device, plan=self.plan, sharders=sharders)
        self.module = self.dmp.module
        self._copy_in(seeded)

    def placements(self) -> dict[str, tuple[str, list[int]]]:
        """Table -> (sharding type, ranks holding a shard of it), as the planner chose."""
        return {name: (p.sharding_type, list(p.ranks)) for name, p in self.plan.plan["ebc"].items()}

    def dense_parameters(self) -> list[torch.nn.Parameter]:
        """Everything the fused table optimizer does not update (the replicated layers)."""
        from torchrec.optim.optimizers import in_backward_optimizer_filter

        return [p for _, p in in_backward_optimizer_filter(self.dmp.named_parameters())]

    # -- state: each rank holds its own shards ---------------------------------------------------

    def local_weights(self) -> dict:
        """The weights as this rank holds them (the local shards of each table, the whole of
        each replicated tensor), detached copies."""
        return _local(self.dmp.state_dict())

    def load_local_weights(self, weights: dict) -> None:
        """``local_weights`` of the same plan back in place (a resume on the same world size)."""
        _copy_local(self.dmp.state_dict(), weights, "model")

    def local_optimizer_state(self) -> dict:
        """The fused table optimizer's state (e.g. Adagrad sums) of this rank's shards."""
        return _local(self.dmp.fused_optimizer.state_dict()["state"])

    def load_local_optimizer_state(self, state: dict) -> None:
        _copy_local(self.dmp.fused_optimizer.state_dict()["state"], state, "tables optimizer")

    def gather(self):
        """``unsharded`` loaded with the current weights on every rank (a collective)."""
        self.unsharded.load_state_dict(self.full_state_dict())
        return self.unsharded

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded weights on every rank (a collective)."""
        out = {}
        with _quiet_torchrec():
            state = self.dmp.state_dict()
            shapes = {k: (v.size(), v.dtype) for k, v in state.items() if _is_sharded(v)}
        for key, value in state.items():
            if _is_sharded(value):
                size, dtype = shapes[key]
                full = torch.zeros(size, dtype=dtype, device=self.cluster.device)
                for shard in value.local_shards():
                    full[_slices(shard)] = shard.tensor
                dist.all_reduce(full)  # shards are disjoint: the sum assembles the table
                out[key] = full.cpu()
            else:
                out[key] = value.detach().cpu().clone()
        return out

    def _copy_in(self, full: dict[str, torch.Tensor]) -> None:
        for key, value in self.dmp.state_dict().items():
            with torch.no_grad():
                if _is_sharded(value):
                    for shard in value.local_shards():
                        shard.tensor.copy_(full[key][_slices(shard)])
                else:
                    value.copy_(full[key])


@contextlib.contextmanager
def _quiet_torchrec():
    """TorchRec 1.8's planner and DMP warn about their own internals (the topology's
    construction, a storage heuristic, DDP's broadcast_buffers, ShardedTensor's deprecation)
    on every rank; none is actionable here."""
    planner_log = logging.getLogger("torchrec.distributed.planner")
    level = planner_log.level
    planner_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        planner_log.setLevel(level)


def _is_sharded(value) -> bool:
    return hasattr(value, "local_shards")


def _slices(shard) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))


def _local(tree):
    if isinstance(tree, dict):
        return {k: _local(v) for k, v in tree.items()}
    if _is_sharded(tree):
        return [s.tensor.detach().cpu().clone() for s in tree.local_shards()]
    return tree.detach().cpu().clone() if isinstance(tree, torch.Tensor) else tree


def _copy_local(target, saved, what: str, path: str = "") -> None:
    """Copy saved local state into the live tensors (sharded state_dicts alias the tables)."""
    if isinstance(target, dict):
        if not isinstance(saved, dict) or set(saved) != set(target):
            raise ValueError(f"{what}: the checkpoint's keys at {path or 'top'} differ from this plan's")
        for k in target:
            _copy_local(target[k], saved[k], what, f"{path}.{k}" if path else k)
        return
    shards = [s.tensor for s in target.local_shards()] if _is_sharded(target) else [target]
    saved = saved if isinstance(saved, list) else [saved]
    if len(saved) != len(shards) or any(a.shape != b.shape for a, b in zip(shards, saved)):
        raise ValueError(f"{what}: {path} holds other shards here than in the checkpoint (another world size or plan?)")
    with torch.no_grad():
        for live, value in zip(shards, saved):
            live.copy_(value)
