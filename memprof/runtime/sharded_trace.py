"""The per-rank traced estimate under data parallelism: rank 0 of N, on fake tensors and torch's fake process group.

The run's own engine runs, as on one device in trace.py: the model is built on meta with the method applied
(``apply_as_run``), wrapped for the strategy by ``parallel.wrap_for_strategy`` (the function the measured
multi-rank run calls), materialised as fake tensors, the optimizer built after wrapping, and two steps traced
under the categorised tracker, which follows FSDP2's storage resizes, its collectives' buffers and DDP's buckets
(tracker.follow_data_parallel). Collectives on the fake process group return at once and move no data, so every
buffer the rank allocates is seen with its real size and lifetime.

- FSDP2 (fsdp, fsdp-grad-op, hsdp; torch/distributed/fsdp/_fully_shard, torch 2.13): meta parameters are sharded
  first, then ``Module.to_empty`` allocates only the rank's shards (dim 0 padded to a multiple of the shard group,
  FSDPParam._init_sharded_param), and the optimizer states are DTensors of the same shards.
- DDP (torch/nn/parallel/distributed.py): wrapped after materialising, what reads tensor values skipped
  (``_ddp_on_fake_tensors``: the init-time collectives, the bucket rebuild), and the all-reduce comm hook
  replaced by one that hands the bucket back unchanged (the fake process group's work has no result; the default
  hook reduces the bucket in place, so the memory is the same).

FSDP in the ``mixed`` regime is FSDP2's own mixed precision: the model built in fp32 (its shards are the masters), a
MixedPrecisionPolicy(param_dtype=half, reduce_dtype=fp32) and a plain optimizer (RunSetup.sharded_masters).
Not traced: ZeRO (DeepSpeed's engine, which cannot run on fake tensors; the analytic estimate models it), offload
(host memory the fake CPU tensors cannot tell apart). On ``device=cuda`` the trace emulates
CUDA kernels as trace.py does, but not the separate streams FSDP2 runs its collectives on, whose blocks the
caching allocator cannot hand to the default stream until they are done. On ``device=cpu`` the collectives are
gloo's, whose reduce-scatter works on a copy of its input (``_gloo_reduce_scatter_copy``); NCCL's does not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Iterator

import torch
from torch import nn

from ..config import FSDP_STRATEGIES, ZERO_STRATEGIES, Device, Offload, ParallelSpec, RunSetup, Strategy
from ..errors import UnsupportedModelError
from ..records import Estimate
from ..spec import ModelSpec
from .parallel import fake_process_group, mixed_param_dtype, wrap_for_strategy
from .trace import materialize, trace_depth, trace_with


def trace_parallel(spec: ModelSpec, setup: RunSetup, layers: str | int = "auto", peft_config=None) -> Estimate:  # noqa: ANN001
    """Traced estimate of one steady-state step of rank 0 of ``setup.parallel`` (fsdp, fsdp-grad-op, hsdp, ddp).

    The estimate's bytes are one rank's; its parameter counts are the whole model's. Depths are traced and
    extrapolated as ``trace.trace`` does, each in the same fake process group.

    Raises:
        UnsupportedModelError: a ZeRO strategy, or offload.
        ConfigError / LibraryRefusalError: as ``trace.trace``.
    """
    par = setup.parallel
    if par is None or par.world_size < 2:
        raise UnsupportedModelError("trace_parallel traces a data-parallel run of 2 or more ranks; "
                                    "use trace.trace for one device")
    check_traceable(par, setup)
    if setup.sharded_masters and layers == "auto":
        # FSDP's mixed precision: the cast copy before each all-gather lands at a different point of the top block's
        # backward at 2 and at 3 blocks (not affine in depth: a 12-block BERT extrapolated 4.6% high), so every block
        # is traced
        layers = "full"
    gloo = _gloo_reduce_scatter_copy() if setup.device is Device.cpu else contextlib.nullcontext()
    with fake_process_group(par.world_size), _ddp_on_fake_tensors(), gloo:
        estimate = trace_with(spec, setup, layers, peft_config,
                              trace_one=functools.partial(trace_depth, prepare=functools.partial(
                                  _prepare, par=par, param_dtype=mixed_param_dtype(setup))))
    note = f"per rank: rank 0 of {par.describe()}, on torch's fake process group (collectives move no data)"
    return dataclasses.replace(estimate, notes=(*estimate.notes, note))


def check_traceable(par: ParallelSpec, setup: RunSetup) -> None:
    """Raise UnsupportedModelError, in one line, for a data-parallel run the trace cannot run."""
    if par.strategy in ZERO_STRATEGIES:
        raise UnsupportedModelError(f"{par.strategy.value} runs in DeepSpeed's engine, which cannot run on fake "
                                    "tensors: it is not traced; the analytic estimate models it (memprof estimate)")
    if par.offload is not Offload.none:
        raise UnsupportedModelError(f"offload {par.offload.value} is not traced (fake tensors do not tell host "
                                    "memory from device memory); the analytic estimate models it (memprof estimate)")


def _prepare(model: nn.Module, host: set[int], par: ParallelSpec, param_dtype: torch.dtype | None = None) -> nn.Module:
    """trace_depth's ``prepare``: wrap the meta model for ``par`` and materialise rank 0's tensors as fake ones."""
    if par.strategy in FSDP_STRATEGIES:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():  # FSDP2 shards the meta parameters (no memory), then only shards exist
            model = wrap_for_strategy(model, par, "cpu", param_dtype=param_dtype)
        # FSDPModule._apply re-registers the sharded parameters after allocating them (reset_sharded_param); ties
        # survive, as to_empty keeps each parameter object
        model.to_empty(device="cpu")
        return model
    if par.strategy is Strategy.ddp:
        materialize(model, "cpu", host)
        ddp = wrap_for_strategy(model, par, "cpu")
        ddp.register_comm_hook(None, _bucket_unchanged)
        return ddp
    raise UnsupportedModelError(f"strategy {par.strategy.value} is not traced")  # pragma: no cover - checked first


def _bucket_unchanged(state, bucket):  # noqa: ANN001, ANN202 (DDP checks the annotations, and they are strings here)
    """A DDP comm hook whose all-reduce is done at once: the bucket itself (the default hook reduces it in place;
    torch/distributed/algorithms/ddp_comm_hooks/default_hooks.py allreduce_hook)."""
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


@contextlib.contextmanager
def _ddp_on_fake_tensors() -> Iterator[None]:
    """What DDP does that reads tensor values, which fake tensors lack, skipped while tracing:

    - the constructor checks parameter shapes across ranks and broadcasts rank 0's values
      (torch/distributed/utils.py ``_verify_param_shape_across_processes``, ``_sync_module_states``); neither
      leaves anything allocated after construction.
    - before the second forward the C++ Reducer rebuilds its buckets in the order gradients became ready
      (``Reducer._rebuild_buckets``), broadcasting the new bucket indices from rank 0. NB: the buckets made at
      construction stay instead: the same bytes (every trainable parameter's gradient, per dtype, split at the
      same size caps), without the moment the old and the new buckets are both alive at the start of that
      forward, when the step is far from its peak.
    """
    import torch.distributed as dist
    from torch.nn.parallel import distributed

    patches = [(distributed, "_verify_param_shape_across_processes", lambda *_args, **_kwargs: None),
               (distributed, "_sync_module_states", lambda *_args, **_kwargs: None),
               (dist.Reducer, "_rebuild_buckets", lambda _self: False)]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


@contextlib.contextmanager
def _gloo_reduce_scatter_copy() -> Iterator[None]:
    """gloo (the CPU backend a CPU run uses) reduce-scatters through a buffer the size of the input, allocated in
    C++ for the call and freed with it: a 2-rank gloo run of FSDP2 under the tracker shows it beside each
    ``foreach_reduce`` (torch 2.13). The fake process group allocates nothing; this allocates the same buffer
    around ``dist.reduce_scatter_single`` (what FSDP2's DefaultReduceScatter calls)."""
    import torch.distributed as dist

    original = dist.reduce_scatter_single

    def reduce_scatter_single(output, input, *args, **kwargs):  # noqa: ANN001, ANN202, A002
        buffer = torch.empty_like(input)  # noqa: F841 - alive for the call, as gloo's is
        return original(output, input, *args, **kwargs)

    dist.reduce_scatter_single = reduce_scatter_single
    try:
        yield
    finally:
        dist.reduce_scatter_single = original
