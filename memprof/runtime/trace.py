"""The traced estimator: the real model and method, run as fake tensors under the categorised tracker.

Build on the meta device -> apply the method (peft or memprof's own) -> materialise as fake tensors ->
warm-up step (allocates optimizer state) -> steady-state step, every phase tracked. No real memory is used.
For deep models a few depths are traced and each phase's breakdown extrapolated linearly in the number of
blocks (blocks are identical); ``trace(..., layers="full")`` traces every block.

``device="cuda"`` (the default target) runs fake CPU tensors under ``CudaEmulation`` (see emulate.py) and
rounds every storage to the CUDA caching allocator's 512-byte blocks.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from typing import Any, Callable, Iterator
from dataclasses import dataclass

import torch

from ..compat import check_supported, lora_target_note
from ..config import Device, Method, QuantSpec, Regime, RunSetup
from ..errors import ConfigError, LibraryRefusalError, UnsupportedModelError
from ..images import image_note, image_run
from ..records import Category, Estimate, MemoryBreakdown, Phase
from ..spec import ModelSpec, Task
from .build import TORCH_DTYPE, ValuesNeededError, enable_checkpointing, apply_method, build_base_model, host_buffers, check_positions, count_trainable, make_optimizer, resolve_attention_of_class, synthetic_batch
from .emulate import CudaEmulation
from .fake_ops import BatchValues, MatmulDtypes, grouped_mm_in_any_dtype
from .quant import emulate_4bit
from .refusals import library_refusals, what_runs
from .step import BACKWARD_HEAD, BACKWARD_TAIL, backward_layer_phase, backward_markers, block_modules, run_step
from .tracker import MemoryTracker

CUDA_BLOCK_BYTES = 512
TRACE_DEPTHS = (2, 3)  # depths traced before extrapolating; both > 1 so the first block's special case is seen


@dataclass(frozen=True)
class DepthTrace:
    depth: int
    total_params: int
    trainable_params: int
    first: dict[str, MemoryBreakdown]   # sub-phase -> breakdown at that sub-phase's peak, warm-up step
    steady: dict[str, MemoryBreakdown]  # same, steady-state step
    steady_bytes: int                   # live between steps
    after_step_bytes: int               # live right after optimizer.step(), before zero_grad
    layer_types: tuple[str, ...] | None = None  # the cut model's block types when chosen (_typed_depths)


FORWARD_EMBED = "forward.embed"  # the forward before the first block: its peak does not grow with the depth


@contextlib.contextmanager
def _forward_markers(model: torch.nn.Module, tracker: MemoryTracker) -> Iterator[None]:
    """Split the forward at the first block, as the backward is split by block: what the embeddings hold at their
    peak (a merged embedding matrix, a prompt encoder's batch) is one sub-phase that stays, the blocks and head
    another that grows. Extrapolating one forward peak that sits in the embeddings at 2 blocks and at the end at 3
    would scale the wrong tensors."""
    blocks = block_modules(model)
    if not blocks:
        yield
        return

    def embed(_module: torch.nn.Module, _args: tuple) -> None:
        if tracker.current_phase.startswith(Phase.forward.value):
            tracker.set_phase(FORWARD_EMBED)

    def first_block(_module: torch.nn.Module, _args: tuple) -> None:
        if tracker.current_phase == FORWARD_EMBED:  # not a checkpointed block recomputed in the backward
            tracker.set_phase(Phase.forward)

    handles = [model.register_forward_pre_hook(embed), blocks[0].register_forward_pre_hook(first_block)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _normalise(peaks: dict[str, tuple[int, MemoryBreakdown]], depth: int) -> dict[str, MemoryBreakdown]:
    """Keep the sub-phases that extrapolate: forward, backward head/top/bottom/tail, optimizer."""
    out: dict[str, MemoryBreakdown] = {}
    for name, (_, bd) in peaks.items():
        if name == backward_layer_phase(depth - 1):
            out["backward.top"] = bd
        elif name == backward_layer_phase(0):
            out["backward.bottom"] = bd
        elif name in (Phase.forward.value, FORWARD_EMBED, Phase.optimizer.value, BACKWARD_HEAD, BACKWARD_TAIL):
            out[name] = bd
    if depth == 1 and "backward.top" in out:
        out["backward.bottom"] = out["backward.top"]
    return out


def trace_depth(spec: ModelSpec, setup: RunSetup, depth: int | None = None, peft_config=None,  # noqa: ANN001
                layer_types: tuple[str, ...] | None = None,
                prepare: Callable[[torch.nn.Module, set[int]], torch.nn.Module] | None = None) -> DepthTrace:
    """Trace two steps of ``spec`` cut to ``depth`` blocks (of ``layer_types``, default the first ones) on fake
    tensors. ``prepare(model, host)``, under the fake mode, materialises the meta model and returns the module to
    train (sharded_trace: wrapped for a data-parallel strategy); default ``materialize``."""
    if layer_types is not None or (depth is not None and depth != spec.num_layers):
        spec = spec.with_layers(depth or spec.num_layers, layer_types)
    check_positions(spec, setup)
    if peft_config is None:
        check_supported(spec, setup)
    cuda = setup.device is Device.cuda
    from torch._subclasses.fake_tensor import FakeTensorMode

    what = what_runs(spec, setup, peft_config)
    # fake tensors made to behave as the run's ops do (fake_ops), inside the translation of what still cannot
    with warnings.catch_warnings(), library_refusals(what), _data_dependent_shapes(what), \
            grouped_mm_in_any_dtype(), BatchValues(), MatmulDtypes(what):
        warnings.simplefilter("ignore")
        model = apply_as_run(spec, setup, peft_config)
        host = _host_tensors(model) if cuda else set()
        if setup.method is Method.qlora:  # bitsandbytes cannot run on fake tensors: emulate its memory
            emulate_4bit(model, setup.quant or QuantSpec(), TORCH_DTYPE[setup.dtype])
        emulation = CudaEmulation() if cuda else None
        if setup.grad_checkpointing:
            enable_checkpointing(model, **({"context_fn": emulation.checkpoint_contexts} if emulation else {}))
        trainable, total = count_trainable(model)
        with FakeTensorMode(allow_non_fake_inputs=True):
            if prepare is None:
                materialize(model, "cpu", host)
            else:
                model = prepare(model, host)
            model.train()
            optimizer = make_optimizer(model, setup, "cuda" if cuda else "cpu")
            batch = synthetic_batch(spec, setup, "cpu")
            tracker = MemoryTracker(round_bytes=CUDA_BLOCK_BYTES if cuda else 1, fake_scalars=True)
            tracker.register_module(model)
            tracker.register_optimizer(optimizer)
            tracker.register(batch.values(), Category.inputs)
            results = []
            held: list = []  # the loop's kept outputs (keep_outputs), across the two steps
            after: list[int] = []
            with tracker, backward_markers(model, tracker), _forward_markers(model, tracker), _unpacked_sequences(), \
                    _sparse_values_gradient():
                ctx = emulation if emulation is not None else _null()
                with ctx, _autocast_switched_off(what, emulation is not None and setup.regime is Regime.amp):
                    for _ in range(2):
                        tracker.reset_peak()
                        run_step(model, batch, optimizer, setup, "cuda" if cuda else "cpu", tracker=tracker,
                                 emulation=emulation, held=held,
                                 after_step=lambda: after.append(tracker.current_bytes))
                        results.append(_normalise(tracker.phase_peaks(), spec.num_layers))
                steady = tracker.current_bytes
            held.clear()
    return DepthTrace(spec.num_layers, total, trainable, results[0], results[1], steady, after[-1], layer_types)


def materialize(model: torch.nn.Module, device: str, host: set[int] = frozenset()) -> None:  # type: ignore[assignment]
    """Replace every parameter and buffer by an uninitialised tensor on ``device`` (fake under FakeTensorMode),
    keeping shared (tied) parameters shared; the buffers in ``host`` (ids) go to the meta device instead, which
    the tracker does not count: they stay in host memory in the run, and each use copies them to the device.
    ``Module.to_empty`` unties parameters and fails on parameters that carry a weakref (peft's prefix encoder)."""
    new: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in new:
                new[id(p)] = torch.nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
            module._parameters[name] = new[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                if id(b) not in new:
                    new[id(b)] = torch.empty_like(b, device="meta" if id(b) in host else device)
                module._buffers[name] = new[id(b)]


@contextlib.contextmanager
def _data_dependent_shapes(what: str) -> Iterator[None]:
    """A step whose tensor shapes depend on values the trace does not know (a boolean-mask index or ``nonzero`` on
    weights: WaveFT's sparse spectrum, CPT's label masks; the batch's own values are known, fake_ops.BatchValues)
    has no size on fake tensors: one line saying so and what measures it instead."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    try:
        yield
    except (DataDependentOutputException, DynamicOutputShapeException) as exc:
        op = str(exc).strip() or type(exc).__name__
        raise UnsupportedModelError(f"{what} cannot be traced on fake tensors: its step has shapes that depend on "
                                    f"tensor values ({op}); measure it instead (memprof measure, CPU or GPU)") from None


@contextlib.contextmanager
def _autocast_switched_off(what: str, emulated_amp: bool) -> Iterator[None]:
    """peft folds LoRA into fused expert weights (target_parameters) under ``torch.autocast(enabled=False)``; the
    CUDA autocast emulation (emulate.CudaAutocast) does not see that switch, casts the fold to half, and
    parametrize refuses it. A real GPU run switches autocast off: one line, and the estimate that models it."""
    try:
        yield
    except ValueError as exc:
        if not (emulated_amp and "parametrization may not change the dtype" in str(exc)):
            raise
        raise UnsupportedModelError(f"{what} cannot be traced under CUDA AMP: peft switches autocast off to fold "
                                    "LoRA into the fused expert weights, which the trace's CUDA autocast emulation "
                                    "does not follow; use the analytic estimate (memprof estimate), trace it in "
                                    "pure precision or on --device cpu") from None


def apply_as_run(spec: ModelSpec, setup: RunSetup, peft_config: Any = None) -> torch.nn.Module:
    """``spec`` built on meta with ``setup``'s method (or ``peft_config``) applied as the run applies it: adapters
    placed as on the run's device (``_adapters_placed_as_on``), and an initialisation that reads the weights'
    values (FRoD, SHiRA) run on random CPU weights of this depth, then moved to meta (the memory is the same).
    peft fills per-model fields into the config it is given (prompt learning's num_layers): each call applies a
    copy, so the config can be traced at another depth."""
    with _adapters_placed_as_on(setup.device):
        try:
            return apply_method(build_base_model(spec, setup, "meta"), spec, setup, copy.deepcopy(peft_config))
        except ValuesNeededError:
            model = apply_method(build_base_model(spec, setup, "cpu"), spec, setup, copy.deepcopy(peft_config))
            materialize(model, "meta")  # not Module.to("meta"), which unties shared weights
            return model


def _host_tensors(model: torch.nn.Module) -> set[int]:
    """Buffers of peft's layers that peft made on the CPU and never moves to the base layer's device (BOFT's
    permutation matrices ``boft_P``: ``register_buffer`` outside the adapter dicts that
    BaseTunerLayer._move_adapter_to_device_of_base_layer moves). The harness keeps them in host memory
    (``harness.keep_on_host``), as peft's own benchmark does; on the trace's meta base they are the peft buffers
    not on meta."""
    return {id(module._buffers[name]) for module, name in host_buffers(model, "meta")}


@contextlib.contextmanager
def _adapters_placed_as_on(device: Device) -> Iterator[None]:
    """peft moves each new adapter to the device and dtype of its base layer
    (BaseTunerLayer._move_adapter_to_device_of_base_layer, peft 0.21.2 tuners_utils.py), and a ParameterDict
    re-wraps each moved tensor as a trainable Parameter. The trace's base layers are on meta, so every entry is
    moved: AdaLoRA's frozen ``ranknum`` becomes trainable, as on a GPU. On a CPU the run's base layers are on the
    CPU, and an entry already there in the base dtype is not moved: it stays frozen (in fp32; a bf16 base still
    casts and re-wraps it). That is restored here for CPU runs."""
    if device is not Device.cpu:
        yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    original = BaseTunerLayer._move_adapter_to_device_of_base_layer

    def move(self, adapter_name: str, device: torch.device | None = None) -> None:  # noqa: ANN001
        base_dtype = self._get_base_layer_device_and_dtype(self.get_base_layer())[1]
        stay = []
        for layer_name in self.adapter_layer_names + self.other_param_names:
            layer = getattr(self, layer_name, None)
            if isinstance(layer, torch.nn.ParameterDict) and adapter_name in layer:
                item = layer[adapter_name]
                if (device is None and item.device.type == "cpu" and not item.requires_grad
                        and (base_dtype is None or item.dtype == base_dtype or not item.dtype.is_floating_point)):
                    stay.append((layer, adapter_name))
        original(self, adapter_name, device)
        for layer, key in stay:
            layer[key].requires_grad_(False)

    BaseTunerLayer._move_adapter_to_device_of_base_layer = move
    try:
        yield
    finally:
        BaseTunerLayer._move_adapter_to_device_of_base_layer = original


@contextlib.contextmanager
def _unpacked_sequences() -> Iterator[None]:
    """transformers' find_packed_sequence_indices cannot read fake position ids, treats the batch as packed
    and builds a (b, 1, s, s) mask, which also stops SDPA's native GQA. memprof's synthetic batches are never
    packed, which is what the function concludes on real tensors: return None, as it would."""
    try:
        from transformers import masking_utils
    except ImportError:  # pragma: no cover - transformers is a dependency of tracing
        yield
        return
    original = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


class _SparseValues(torch.autograd.Function):
    """``torch.sparse_coo_tensor(indices, values, size)`` with the gradient of ``values`` gathered at ``indices``.

    autograd's own node for it (SparseCooTensorWithDimsAndTensorsBackward0) reads the sparse gradient's values,
    whose count fake tensors do not know (they answer 0): SHiRA's backward then fails. The values' gradient is the
    incoming gradient at the indices either way, a tensor of the values' size, which this computes on the dense
    gradient the next op hands back (``weight += delta``: AddBackward passes the dense gradient through)."""

    @staticmethod
    def forward(ctx, build, indices, values, size, kwargs):  # noqa: ANN001, ANN205
        # the sparse result holds the values and int64 indices (a copy of SHiRA's int32 ones), and the op that
        # consumes it keeps it for backward (``dense += sparse`` saves it for sparse_mask): both stay alive until
        # the backward, as in a real step
        indices = indices.long()
        ctx.save_for_backward(indices, values)
        return build(indices, values, size, **kwargs)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        indices, _ = ctx.saved_tensors
        dense = grad.to_dense() if grad.is_sparse else grad
        return None, None, dense[tuple(indices)], None, None


@contextlib.contextmanager
def _sparse_values_gradient() -> Iterator[None]:
    """Trace sparse COO tensors built from trainable values (peft SHiRA's delta) with _SparseValues."""
    original = torch.sparse_coo_tensor

    def sparse_coo_tensor(indices, values, *args, **kwargs):  # noqa: ANN001, ANN202
        size = args[0] if len(args) == 1 else None if args else kwargs.get("size")
        if size is None or not (isinstance(values, torch.Tensor) and values.requires_grad):
            return original(indices, values, *args, **kwargs)
        return _SparseValues.apply(original, indices, values, size, {k: v for k, v in kwargs.items() if k != "size"})

    torch.sparse_coo_tensor = sparse_coo_tensor
    try:
        yield
    finally:
        torch.sparse_coo_tensor = original


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _combine(parts: list[tuple[float, MemoryBreakdown]]) -> MemoryBreakdown:
    """sum(weight * breakdown), per category (a linear extrapolation in the depth; see ``_weights``)."""
    out: dict[str, float] = {}
    for weight, bd in parts:
        for key, value in bd.as_dict().items():
            out[key] = out.get(key, 0.0) + weight * value
    return MemoryBreakdown.from_dict({k: max(0, round(v)) for k, v in out.items()})


def _weights(runs: list[DepthTrace], spec: ModelSpec) -> list[float]:
    """Each traced depth's weight in the extrapolation to the model's depth. Two runs of one layer type (depths
    d and d + 1): the line through them, at L. Per layer type (``_typed_depths``: a base with one middle block of
    each type, then one run per type with one more block of it): base + sum over types of (n_type - 1) x (run -
    base), n_type the model's middle blocks of that type."""
    if len(runs) == 2 and runs[0].layer_types is None:
        a, b = runs
        scale = (spec.num_layers - a.depth) / (b.depth - a.depth)
        return [1 - scale, scale]
    middle = [spec.layer_type(i) for i in range(1, spec.num_layers - 1)]
    kinds = sorted(set(middle))
    extra = [middle.count(kind) - 1 for kind in kinds]
    return [1 - sum(extra), *extra]


def _typed_depths(spec: ModelSpec) -> list[tuple[str, ...]] | None:
    """For a stack whose blocks differ in attention type (Gemma-2/3, Qwen2 with max_window_layers): the layer
    types of the cut models to trace: the first block, one middle block of each type and the last block (so every
    cut model builds the masks and rotary tables of every type, as the model does), then that with one more
    block of each type in turn. None when every block is alike (the two-depth extrapolation is exact)."""
    types = [spec.layer_type(i) for i in range(spec.num_layers)]
    middle = sorted(set(types[1:-1]))
    if len(set(types)) < 2 or spec.num_layers <= len(middle) + 3:
        return None
    first, last = types[0], types[-1]
    return [(first, *middle, last), *((first, *middle, kind, last) for kind in middle)]


def _phase_of(sub: str) -> Phase:
    return Phase(sub.split(".")[0])


def trace(spec: ModelSpec, setup: RunSetup, layers: str | int = "auto", peft_config=None) -> Estimate:  # noqa: ANN001
    """Traced estimate of one steady-state training step (per rank under data parallelism: sharded_trace).

    Args:
        spec: the model (any family transformers can build).
        setup: the run; ``setup.device`` picks CUDA emulation (default) or plain CPU kernels; ``setup.parallel``
            over more than one rank traces rank 0 of the strategy (sharded_trace.trace_parallel).
        layers: "auto" traces depths 2 and 3 and extrapolates (full depth when the model has <= 3 blocks);
            "full" traces every block; an int traces that many blocks and extrapolates from it and one more.
        peft_config: an explicit peft config object (``--peft-config``) instead of the method's own.

    Raises:
        ConfigError: the model cannot be built or the method cannot be applied.
        LibraryRefusalError: the installed transformers / peft refuse this method on this model.
        UnsupportedModelError: a strategy the trace cannot run (ZeRO; sharded_trace).
    """
    if setup.parallel is not None and setup.world_size > 1:
        from .sharded_trace import trace_parallel

        return trace_parallel(spec, setup, layers, peft_config)
    return trace_with(spec, setup, layers, peft_config)


def trace_with(spec: ModelSpec, setup: RunSetup, layers: str | int = "auto", peft_config=None,  # noqa: ANN001
               trace_one: Callable[..., DepthTrace] = trace_depth) -> Estimate:
    """``trace`` with each depth traced by ``trace_one`` (``trace_depth``'s signature)."""
    start = time.perf_counter()
    depth = spec.num_layers
    setup = image_run(spec, setup)  # image-cls: the image size, and seq_len = the tokens of one image
    setup, attention_note = resolve_attention_of_class(spec, setup)
    if isinstance(layers, bool) or not (layers in ("auto", "full") or isinstance(layers, int)):
        raise ConfigError(f"trace layers must be auto, full or a block count, got {layers!r}")
    if isinstance(layers, int) and not 1 <= layers <= max(1, depth - 2):
        raise ConfigError(f"trace depth must be between 1 and {max(1, depth - 2)} for a {depth}-block model "
                          f"(or auto / full), got {layers}")
    if spec.task is Task.seq2seq:
        layers = "full"  # an encoder and a decoder stack: cutting one depth would not scale the other
    cut_note = None
    typed = _typed_depths(spec) if layers == "auto" else None
    if layers == "full" or depth <= max(TRACE_DEPTHS):
        runs = [trace_one(spec, setup, depth, peft_config)]
    elif typed is not None:  # per layer type: blocks of each type counted as often as the model has them
        runs = [trace_one(spec, setup, len(types), peft_config, types) for types in typed]
    else:
        d1 = int(layers) if isinstance(layers, int) else TRACE_DEPTHS[0]
        if not 1 <= d1 < depth - 1:
            raise ConfigError(f"trace depth must be between 1 and {depth - 2} for a {depth}-block model")
        try:
            runs = [trace_one(spec, setup, d1, peft_config), trace_one(spec, setup, d1 + 1, peft_config)]
        except (ConfigError, LibraryRefusalError) as exc:
            if peft_config is None or isinstance(exc, ValuesNeededError):
                raise
            # a config that names blocks the cut model lacks (AdaptionPrompt's adapter_layers, layers_to_transform):
            # its structure does not repeat per block, so the whole model is traced (the answer is exact, slower)
            runs = [trace_one(spec, setup, depth, peft_config)]
            cut_note = f"traced at full depth: at {d1} blocks the peft config does not apply ({exc})"
    if len(runs) == 1:
        r = runs[0]
        first, steady, total, trainable, steady_bytes = r.first, r.steady, r.total_params, r.trainable_params, r.steady_bytes
        after_step_bytes = r.after_step_bytes
    else:
        weights = _weights(runs, spec)

        def mix(values: list[float]) -> int:
            return round(sum(w * v for w, v in zip(weights, values)))

        steady = {k: _combine([(w, r.steady[k]) for w, r in zip(weights, runs)])
                  for k in set.intersection(*(set(r.steady) for r in runs))}
        first = {k: _combine([(w, r.first[k]) for w, r in zip(weights, runs)])
                 for k in set.intersection(*(set(r.first) for r in runs))}
        total, trainable = mix([r.total_params for r in runs]), mix([r.trainable_params for r in runs])
        steady_bytes, after_step_bytes = mix([r.steady_bytes for r in runs]), mix([r.after_step_bytes for r in runs])
    peak_key = max(steady, key=lambda k: steady[k].total_bytes)
    phase_peaks: dict[Phase, MemoryBreakdown] = {}
    for key, bd in steady.items():
        ph = _phase_of(key)
        if ph not in phase_peaks or bd.total_bytes > phase_peaks[ph].total_bytes:
            phase_peaks[ph] = bd
    peak = steady[peak_key]
    from ..analytic.overheads import device_totals  # pure helper shared with the analytic estimator

    if len(runs) == 1:
        how = "full depth"
    elif typed is not None:
        how = f"per layer type ({', '.join(sorted(set(typed[0])))}: {len(runs)} cut models), extrapolated to {depth}"
    else:
        how = f"depths {runs[0].depth} and {runs[1].depth}, extrapolated to {depth}"
    notes = [f"traced {how}"
             f" on fake tensors ({'CUDA kernels emulated, 512-byte blocks' if setup.device is Device.cuda else 'CPU kernels'})"]
    if cut_note:
        notes.append(cut_note)
    if image_note(spec, setup):
        notes.append(image_note(spec, setup))
    if attention_note:
        notes.append(attention_note)
    if peft_config is None and (lora_note := lora_target_note(spec, setup)):
        notes.append(lora_note)
    return Estimate(
        kind="traced", spec=spec, setup=setup, total_params=total, trainable_params=trainable, peak=peak,
        peak_phase=_phase_of(peak_key), phase_peaks=tuple(sorted(phase_peaks.items(), key=lambda kv: list(Phase).index(kv[0]))),
        first_step_peak_bytes=max(bd.total_bytes for bd in first.values()), steady_bytes=steady_bytes,
        after_step_bytes=after_step_bytes,
        device=device_totals(peak.total_bytes, setup), notes=tuple(notes), elapsed_s=time.perf_counter() - start,
    )


def trace_subphases(spec: ModelSpec, setup: RunSetup) -> dict[str, MemoryBreakdown]:
    """Full-depth steady-state sub-phase peaks (for tests of the extrapolation)."""
    return trace_depth(spec, setup).steady
