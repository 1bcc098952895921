"""Data parallelism as the engines apply it: one function that wraps a model for a strategy, used alike by the
sharded trace (fake process group, fake tensors) and the measured multi-rank run (gloo on CPU, NCCL on GPUs).

FSDP2 (torch.distributed.fsdp.fully_shard, torch 2.13): one FSDP group per transformer block and one for the root
(the embeddings, final norm, head and whatever else is left), as torchtitan and accelerate's FSDP2 plugin wrap a
decoder; ``reshard_after_forward`` True for ``fsdp`` (FULL_SHARD), False for ``fsdp-grad-op`` (SHARD_GRAD_OP);
``hsdp`` a 2-D mesh (replicate, shard). DDP: torch.nn.parallel.DistributedDataParallel with its defaults
(bucket_cap_mb=25, gradient_as_bucket_view=False), whose gradient buckets (made by the C++ Reducer when the wrapper is
constructed and again before the second forward, seen by no tracker then) are kept as weakrefs on the wrapper for
MemoryTracker.register_module (tracker.PERSISTENT_GRADIENT_BUFFERS). DeepSpeed ZeRO is not wrapped here (memprof[deepspeed]).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Any, Iterator

import torch
from torch import nn

from ..config import FSDP_STRATEGIES, ParallelSpec, Strategy
from ..errors import ConfigError
from .step import block_modules
from .tracker import PERSISTENT_GRADIENT_BUFFERS


def device_mesh(par: ParallelSpec, device_type: str):  # noqa: ANN201 (torch.distributed.device_mesh.DeviceMesh)
    """The mesh a strategy shards over: 1-D over every rank, HSDP 2-D (replicas, shard group)."""
    from torch.distributed.device_mesh import init_device_mesh

    if par.strategy is Strategy.hsdp:
        group = par.shard_group
        return init_device_mesh(device_type, (par.world_size // group, group), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device_type, (par.world_size,))


def wrap_for_strategy(model: nn.Module, par: ParallelSpec, device_type: str, mesh=None,  # noqa: ANN001
                      param_dtype: torch.dtype | None = None) -> nn.Module:
    """Apply ``par.strategy`` to ``model`` (a process group of ``par.world_size`` ranks must be initialised).

    FSDP strategies shard in place and return the same module (blocks first, then the root, as fully_shard's
    docs require); DDP returns the DistributedDataParallel wrapper (a subclass that only remembers its buckets for
    the tracker). Call it before materialising a meta model
    (FSDP2 shards meta parameters; ``to_empty`` then allocates only the shards) and before building the optimizer.

    Raises:
        ConfigError: a ZeRO strategy (DeepSpeed's engine, not torch's).
    """
    if par.strategy in FSDP_STRATEGIES:
        from torch.distributed.fsdp import fully_shard

        mesh = mesh if mesh is not None else device_mesh(par, device_type)
        reshard = par.strategy is not Strategy.fsdp_grad_op
        extra = {}
        if param_dtype is not None:  # the mixed regime: fp32 shards gathered in half, gradients reduced in fp32
            from torch.distributed.fsdp import MixedPrecisionPolicy

            extra["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in block_modules(model):
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard, **extra)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard, **extra)
        return model
    if par.strategy is Strategy.ddp:
        with _NewTensors() as made:  # the Reducer's buckets (torch/csrc/distributed/c10d/reducer.cpp)
            ddp = _ddp_class()(model, find_unused_parameters=False)
        setattr(ddp, PERSISTENT_GRADIENT_BUFFERS, made.refs())
        return ddp
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


@functools.cache
def _ddp_class() -> type:
    from torch.nn.parallel import DistributedDataParallel

    class RememberingDDP(DistributedDataParallel):
        """DistributedDataParallel that remembers its gradient buckets as the C++ Reducer makes them: when it is
        constructed, and when the Reducer rebuilds them in gradient-ready order in the second forward's
        ``_pre_forward`` (torch/nn/parallel/distributed.py), which a tracker entered only for a later step would
        not see (the harness's tracked step). Nothing else differs."""

        def _pre_forward(self, *inputs: Any, **kwargs: Any) -> Any:
            if self._has_rebuilt_buckets:
                return super()._pre_forward(*inputs, **kwargs)
            with _NewTensors() as made:
                out = super()._pre_forward(*inputs, **kwargs)
            if self._has_rebuilt_buckets:
                setattr(self, PERSISTENT_GRADIENT_BUFFERS, made.refs())
            return out

    return RememberingDDP


class _NewTensors:
    """Collect the tensors ``torch.empty`` makes inside the block (the Reducer allocates its buckets with
    ``at::empty``), as weakrefs: a bucket lives as long as the Reducer holds it."""

    def __enter__(self) -> "_NewTensors":
        from torch.utils._python_dispatch import TorchDispatchMode

        made: list[weakref.ref] = []

        class Collect(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
                out = func(*args, **(kwargs or {}))
                if isinstance(out, torch.Tensor) and func is torch.ops.aten.empty.memory_format:
                    made.append(weakref.ref(out))
                return out

        self._made = made
        self._mode = Collect()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)

    def refs(self) -> list[weakref.ref]:
        """Weakrefs to the tensors made that are still alive."""
        return [ref for ref in self._made if ref() is not None]


def mixed_param_dtype(setup) -> torch.dtype | None:  # noqa: ANN001 (RunSetup)
    """The MixedPrecisionPolicy param_dtype of an FSDP run in the mixed regime (RunSetup.sharded_masters), else None."""
    if not setup.sharded_masters:
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[setup.dtype.value]
