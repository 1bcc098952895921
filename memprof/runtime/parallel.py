"""Data parallelism as the engines apply it: one function that wraps a model for a strategy, used alike by the
sharded trace (fake process group, fake tensors) and the measured multi-rank run (gloo on CPU, NCCL on GPUs).

FSDP2 (torch.distributed.fsdp.fully_shard, torch 2.13): one FSDP group per transformer block and one for the root
(the embeddings, final norm, head and whatever else is left), as torchtitan and accelerate's FSDP2 plugin wrap a
decoder; ``reshard_after_forward`` True for ``fsdp`` (FULL_SHARD), False for ``fsdp-grad-op`` (SHARD_GRAD_OP);
``hsdp`` a 2-D mesh (replicate, shard). DDP: torch.nn.parallel.DistributedDataParallel with its defaults
(bucket_cap_mb=25, gradient_as_bucket_view=False). DeepSpeed ZeRO is not wrapped here (memprof[deepspeed]).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..config import FSDP_STRATEGIES, ParallelSpec, Strategy
from ..errors import ConfigError
from .step import block_modules


def device_mesh(par: ParallelSpec, device_type: str):  # noqa: ANN201 (torch.distributed.device_mesh.DeviceMesh)
    """The mesh a strategy shards over: 1-D over every rank, HSDP 2-D (replicas, shard group)."""
    from torch.distributed.device_mesh import init_device_mesh

    if par.strategy is Strategy.hsdp:
        group = par.shard_group
        return init_device_mesh(device_type, (par.world_size // group, group), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device_type, (par.world_size,))


def wrap_for_strategy(model: nn.Module, par: ParallelSpec, device_type: str, mesh=None) -> nn.Module:  # noqa: ANN001
    """Apply ``par.strategy`` to ``model`` (a process group of ``par.world_size`` ranks must be initialised).

    FSDP strategies shard in place and return the same module (blocks first, then the root, as fully_shard's
    docs require); DDP returns the DistributedDataParallel wrapper. Call it before materialising a meta model
    (FSDP2 shards meta parameters; ``to_empty`` then allocates only the shards) and before building the optimizer.

    Raises:
        ConfigError: a ZeRO strategy (DeepSpeed's engine, not torch's).
    """
    if par.strategy in FSDP_STRATEGIES:
        from torch.distributed.fsdp import fully_shard

        mesh = mesh if mesh is not None else device_mesh(par, device_type)
        reshard = par.strategy is not Strategy.fsdp_grad_op
        for block in block_modules(model):
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
        return model
    if par.strategy is Strategy.ddp:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, find_unused_parameters=False)
    raise ConfigError(f"{par.strategy.value} runs in DeepSpeed's engine, which memprof does not wrap here; "
                      "the analytic estimate models it (memprof estimate --strategy ...)")


@contextlib.contextmanager
def fake_process_group(world_size: int) -> Iterator[None]:
    """torch's fake process group as rank 0 of ``world_size``: collectives return at once and move no data, so
    one process runs what one rank of N runs (the sharded trace). Torn down on exit."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise ConfigError("a process group is already initialised in this process; the sharded trace makes its own")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (what the rank's memory holds), else the tensor itself."""
    to_local = getattr(t, "_local_tensor", None)
    return to_local if isinstance(to_local, torch.Tensor) else t
