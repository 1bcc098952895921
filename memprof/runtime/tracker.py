"""A categorised live-tensor tracker: a TorchDispatchMode that follows every storage created under it.

Works on real CPU/CUDA tensors and on fake tensors (the traced estimator), and with frozen parameters (where
``torch.distributed._tools.mem_tracker.MemTracker`` raises). Each new storage is counted when an op returns it
and uncounted when it dies (a weakref callback on the storage). At every peak (overall and per phase) the set
of live storages is snapshotted lazily (only when memory starts to fall again), and categories are resolved at
the end, when it is known which storages became gradients or optimizer states.

Data parallelism (runtime/parallel.py): a DTensor (FSDP2's sharded parameters, their gradients and optimizer
states) counts as its local shard, the rank's memory. While a process group is initialised, entering the tracker
also follows what no dispatch mode sees (``follow_data_parallel``): FSDP2's all-gathered parameter storage,
allocated and freed by ``untyped_storage().resize_`` (weight copies), its all-gather and reduce-scatter buffers
(temporaries), and DDP's gradient buckets, rebuilt by the C++ Reducer before the second forward (gradients; those
the Reducer made before the tracker was entered are registered with the module, ``PERSISTENT_GRADIENT_BUFFERS``).

Known limitations: storages created outside the mode (before ``__enter__``) are invisible unless registered
(parameters, buffers, the batch are); allocator rounding (512-byte blocks on CUDA) is not applied; ops that
run in C++ without dispatching through Python (e.g. autograd's own buffer accumulation) are seen through the
ops they call; a collective backend's own buffers are seen only when an op returns a view of them (gloo's
reduce-scatter copy is; NCCL's buffers are not).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..records import Category, MemoryBreakdown, Phase

_COPY_OPS = {"aten::_to_copy", "aten::to", "aten::clone", "aten::_autocast_to_reduced_precision"}
# a module attribute holding weakrefs to tensors that persist as gradient storage outside .grad: DDP's buckets, made
# by the C++ Reducer at construction and rebuilt before the second forward (parallel.wrap_for_strategy's wrapper
# keeps it current; register_module reads it)
PERSISTENT_GRADIENT_BUFFERS = "_memprof_gradient_buffers"



def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (what the rank's memory holds: FSDP2's parameters, gradients, states), else ``t``."""
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else t

@dataclass
class _Info:
    nbytes: int
    phase: str
    label: Category | None  # known at creation (params, inputs, weight copies) or resolved later


def _holds(refs: dict[int, weakref.ref], t: object) -> bool:
    """Whether ``t`` itself (not an equal tensor: comparing fake tensors has no value) is in ``refs``."""
    ref = refs.get(id(t))
    return ref is not None and ref() is t


class MemoryTracker(TorchDispatchMode):
    """Track live tensor bytes by category and phase.

    Usage::

        tracker = MemoryTracker()
        tracker.register_module(model)          # parameters and buffers, before the step
        tracker.register(batch.values(), Category.inputs)
        with tracker:
            with tracker.phase(Phase.forward): loss = model(**batch).loss
            tracker.mark_activations()          # what is alive now is an activation (or a weight copy)
            with tracker.phase(Phase.backward): loss.backward()
            tracker.mark_gradients(model)
            with tracker.phase(Phase.optimizer): opt.step()
            tracker.mark_optimizer(opt)
        tracker.breakdown()                     # MemoryBreakdown at the overall peak
    """

    def __init__(self, round_bytes: int = 1, fake_scalars: bool = False) -> None:
        """round_bytes: round each storage up to a multiple (512 = CUDA caching allocator blocks).
        fake_scalars: answer ``.item()`` on fake tensors with 1 (optimizers read step counters; values never
        matter to memory) instead of failing with DataDependentOutputException. A boolean is False (no NaN
        found, not every mask entry set), except a uniform draw compared above a constant
        (``torch.rand(1) > module_dropout``, LoHa/LoKr/LyCORIS module dropout), which is True: the branch that
        applies the module, certain at dropout 0 and the costlier one otherwise."""
        super().__init__()
        self.round_bytes = round_bytes
        self.fake_scalars = fake_scalars
        self._draws: dict[int, weakref.ref] = {}   # id -> fake uniform draws in [0, 1)
        self._kept: dict[int, weakref.ref] = {}    # id -> draw > constant (True when read)
        self._live: dict[int, _Info] = {}
        self._refs: dict[int, weakref.ref] = {}
        self._serial = 0
        self._keys: dict[int, int] = {}      # storage _cdata -> serial key, while alive
        self.current_bytes = 0
        self.peak_bytes = 0
        self._phase = "setup"
        self._phase_peak: dict[str, int] = {}
        self._phase_snap: dict[str, dict[int, tuple[int, str, Category | None]]] = {}
        self._dirty: set[str] = set()        # peaks reached but not yet snapshotted ("*" = overall)
        self._snap: dict[int, tuple[int, str, Category | None]] = {}
        self._resolved: dict[int, Category] = {}
        self._param_keys: set[int] = set()   # parameter storages (and FSDP's all-gathered ones): copies are weights
        self._new_label: Category | None = None  # label of every storage made now (``labelled``)
        self._parallel: contextlib.ExitStack | None = None

    # ---- registration -------------------------------------------------------------------------------
    def _key_of(self, t: torch.Tensor) -> tuple[int, Any] | None:
        t = local_tensor(t)
        if t.device.type == "meta":  # no memory: a host-resident tensor in a trace (trace.materialize)
            return None
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return None
        return st._cdata, st

    def _track(self, t: torch.Tensor, label: Category | None) -> int | None:
        found = self._key_of(t)
        if found is None:
            return None
        cdata, st = found
        key = self._keys.get(cdata)
        nbytes = st.nbytes()
        if self.round_bytes > 1 and nbytes:
            nbytes = -(-nbytes // self.round_bytes) * self.round_bytes
        if key is not None:
            info = self._live[key]
            if nbytes != info.nbytes:  # resized in place (resize_, set_)
                if nbytes < info.nbytes:
                    self._snapshot()  # a fall: the peak reached so far is snapshotted first, as in _free
                self._add(nbytes - info.nbytes)
                info.nbytes = nbytes
            if label is not None and info.label is None:
                info.label = label
            return key
        self._serial += 1
        key = self._serial
        self._keys[cdata] = key
        self._live[key] = _Info(nbytes, self._phase, label)
        self._refs[key] = weakref.ref(st, lambda _r, k=key, c=cdata: self._free(k, c))
        self._add(nbytes)
        return key

    def register(self, tensors: Iterable[torch.Tensor], label: Category) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                key = self._track(t, label)
                if key is not None:
                    self._live[key].label = label

    def register_module(self, model: torch.nn.Module) -> None:
        """Register parameters (trainable / frozen) and buffers (frozen) that exist before the step."""
        for p in model.parameters():
            key = self._track(p, Category.params_trainable if p.requires_grad else Category.params_frozen)
            if key is not None:
                self._live[key].label = Category.params_trainable if p.requires_grad else Category.params_frozen
                self._param_keys.add(key)
        self.register(model.buffers(), Category.params_frozen)
        # gradients kept between steps (zero_grad(set_to_none=False))
        self.register((p.grad for p in model.parameters() if p.grad is not None), Category.gradients)
        buffers = (ref() for ref in getattr(model, PERSISTENT_GRADIENT_BUFFERS, ()))
        self.register((t for t in buffers if t is not None), Category.gradients)

    def register_optimizer(self, optimizer: Any) -> None:
        """Register optimizer tensors created before tracking starts (mixed-regime master weights, and any
        state already allocated)."""
        self.register(self._masters(optimizer), Category.master_weights)
        for state in optimizer.state.values():
            self.register((v for v in state.values() if isinstance(v, torch.Tensor)), Category.optimizer_states)

    # ---- accounting ---------------------------------------------------------------------------------
    def _add(self, nbytes: int) -> None:
        self.current_bytes += nbytes
        if nbytes <= 0:
            return
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
            self._dirty.add("*")
        if self.current_bytes > self._phase_peak.get(self._phase, -1):
            self._phase_peak[self._phase] = self.current_bytes
            self._dirty.add(self._phase)

    def _snapshot(self) -> None:
        if not self._dirty:
            return
        snap = {k: (i.nbytes, i.phase, i.label) for k, i in self._live.items()}
        for which in self._dirty:
            if which == "*":
                self._snap = snap
            else:
                self._phase_snap[which] = snap
        self._dirty.clear()

    def _free(self, key: int, cdata: int) -> None:
        info = self._live.get(key)
        if info is None:
            return
        self._snapshot()
        del self._live[key]
        self._refs.pop(key, None)
        if self._keys.get(cdata) == key:
            del self._keys[cdata]
        self.current_bytes -= info.nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if self.fake_scalars and func is torch.ops.aten._local_scalar_dense.default \
                and type(args[0]).__name__ == "FakeTensor":
            if args[0].dtype == torch.bool:
                return _holds(self._kept, args[0])
            return 1.0 if args[0].is_floating_point() else 1
        out = func(*args, **(kwargs or {}))
        if self.fake_scalars and isinstance(out, torch.Tensor) and type(out).__name__ == "FakeTensor":
            if func in (torch.ops.aten.rand.default, torch.ops.aten.uniform_.default):
                self._draws[id(out)] = weakref.ref(out)
            elif func is torch.ops.aten.gt.Scalar and _holds(self._draws, args[0]) and float(args[1]) < 1.0:
                self._kept[id(out)] = weakref.ref(out)
        label = self._new_label
        if func._schema.name in _COPY_OPS and args and isinstance(args[0], torch.Tensor):
            src = self._key_of(args[0])
            if src is not None and self._keys.get(src[0]) in self._param_keys:
                label = Category.weight_copies
        flat, _ = tree_flatten(out)
        for t in flat:
            if isinstance(t, torch.Tensor):
                self._track(t, label)
        return out

    # ---- data parallelism ---------------------------------------------------------------------------
    def __enter__(self):  # noqa: ANN204
        out = super().__enter__()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self._parallel = contextlib.ExitStack()
            self._parallel.enter_context(follow_data_parallel())
        return out

    def __exit__(self, *exc: object) -> None:
        if self._parallel is not None:
            self._parallel.close()
            self._parallel = None
        super().__exit__(*exc)

    @contextlib.contextmanager
    def labelled(self, label: Category) -> Iterator[None]:
        """Label every storage ops make inside the block (a collective's buffers, DDP's rebuilt buckets)."""
        previous, self._new_label = self._new_label, label
        try:
            yield
        finally:
            self._new_label = previous

    def note_storage(self, t: torch.Tensor, label: Category, weight: bool = False) -> None:
        """Count ``t``'s storage at its size now: after an ``untyped_storage().resize_`` no op reports (FSDP2's
        alloc_storage / free_storage), or on first sight. ``weight``: its copies are weight copies too."""
        key = self._track(t, None)
        if key is None:
            return
        self._live[key].label = label
        if weight:
            self._param_keys.add(key)

    # ---- phases and labels --------------------------------------------------------------------------
    def set_phase(self, phase: Phase | str) -> None:
        """Switch phase without a context (used from autograd hooks to split the backward by layer)."""
        self._snapshot()
        self._phase = phase.value if isinstance(phase, Phase) else phase
        self._open_phase()

    def _open_phase(self) -> None:
        # a phase that allocates nothing (plain SGD's step) still has a peak: what is live when it starts
        if self.current_bytes > self._phase_peak.get(self._phase, -1):
            self._phase_peak[self._phase] = self.current_bytes
            self._dirty.add(self._phase)

    @property
    def current_phase(self) -> str:
        return self._phase

    @contextlib.contextmanager
    def phase(self, phase: Phase | str) -> Iterator[None]:
        previous = self._phase
        self._snapshot()
        self._phase = phase.value if isinstance(phase, Phase) else phase
        self._open_phase()
        try:
            yield
        finally:
            self._snapshot()
            self._phase = previous

    def mark_activations(self) -> None:
        """Everything created in the forward phase and alive now is an activation (unless labelled)."""
        for key, info in self._live.items():
            if info.label is None and info.phase.startswith(Phase.forward.value):
                self._resolved.setdefault(key, Category.activations)

    def mark_gradients(self, model: torch.nn.Module) -> None:
        for p in model.parameters():
            if p.grad is not None:
                self._resolve(p.grad, Category.gradients)

    def mark_optimizer(self, optimizer: Any) -> None:
        """Label optimizer state tensors (and master weights of the mixed regime)."""
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.numel() > 1:
                    self._resolve(value, Category.optimizer_states)
        for m in self._masters(optimizer):
            self._resolve(m, Category.master_weights)
            if m.grad is not None:
                self._resolve(m.grad, Category.gradients)

    def _masters(self, optimizer: Any) -> list[torch.Tensor]:
        """The mixed regime's fp32 master weights, less those that are a parameter's own storage (an fp32
        adapter's ``p.detach().float()`` is ``p``): those stay trainable parameters, as the estimator counts."""
        out = []
        for m in getattr(optimizer, "masters", ()):
            found = self._key_of(m)
            if found is None or self._keys.get(found[0]) not in self._param_keys:
                out.append(m)
        return out

    def _resolve(self, t: torch.Tensor, label: Category) -> None:
        found = self._key_of(t)
        if found is not None and found[0] in self._keys:
            self._resolved[self._keys[found[0]]] = label

    def reset_peak(self) -> None:
        """Start a new measurement window (e.g. after the warm-up step) from the current live set."""
        self._snapshot()
        self.peak_bytes = self.current_bytes
        self._phase_peak.clear()
        self._phase_snap.clear()
        self._snap = {k: (i.nbytes, i.phase, i.label) for k, i in self._live.items()}

    # ---- results ------------------------------------------------------------------------------------
    def _categorise(self, snap: dict[int, tuple[int, str, Category | None]]) -> MemoryBreakdown:
        totals = {c.value: 0 for c in Category}
        for key, (nbytes, _phase, label) in snap.items():
            cat = self._resolved.get(key) or label or Category.temporaries
            totals[cat.value] += nbytes
        totals.pop(Category.overhead.value)
        return MemoryBreakdown(**totals)

    def breakdown(self) -> MemoryBreakdown:
        self._snapshot()
        return self._categorise(self._snap)

    def phase_peaks(self) -> dict[str, tuple[int, MemoryBreakdown]]:
        self._snapshot()
        return {p: (self._phase_peak[p], self._categorise(s)) for p, s in self._phase_snap.items()}

    def live_breakdown(self) -> MemoryBreakdown:
        return self._categorise({k: (i.nbytes, i.phase, i.label) for k, i in self._live.items()})


def label_in_active_trackers(t: torch.Tensor, label: Category) -> None:
    """File ``t`` under ``label`` in every MemoryTracker now active (for tensors made by ops that say
    nothing of their role, such as an emulated dequantization's ``torch.empty``)."""
    for tracker in _active_trackers():
        tracker.register([t], label)


def _active_trackers() -> list[MemoryTracker]:
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return [mode for mode in _get_current_dispatch_mode_stack() if isinstance(mode, MemoryTracker)]


_patches: contextlib.ExitStack | None = None  # installed by the first follow_data_parallel context open
_followers = 0


@contextlib.contextmanager
def follow_data_parallel() -> Iterator[None]:
    """Show every active MemoryTracker what data parallelism does outside the dispatcher (MemoryTracker enters
    this itself while a process group is initialised):

    - FSDP2 (torch/distributed/fsdp/_fully_shard/_fsdp_param.py ``alloc_storage`` / ``free_storage``, torch 2.13)
      resizes each unsharded parameter's all-gather output storage to its full size before a block runs and to 0
      after: counted at each resize, as weight copies (their autocast copies too).
    - FSDP2's ``foreach_all_gather`` and ``foreach_reduce`` (_fsdp_collectives.py): their buffers are temporaries
      (the sharded gradients, views of the reduce-scatter output, are labelled gradients when marked).
    - DDP (torch/nn/parallel/distributed.py ``_pre_forward``): the Reducer rebuilds its gradient buckets before the
      second forward, in C++ (``Reducer._rebuild_buckets``): the new buckets are gradients.
    """
    global _patches, _followers
    if _followers == 0:
        _patches = contextlib.ExitStack()
        _install_patches(_patches)
    _followers += 1
    try:
        yield
    finally:
        _followers -= 1
        if _followers == 0 and _patches is not None:
            _patches.close()
            _patches = None


def _install_patches(stack: contextlib.ExitStack) -> None:
    try:
        import torch.distributed as dist
        from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group
    except ImportError:  # pragma: no cover - a torch build without distributed
        return

    def patch(owner: Any, name: str, make: Any) -> None:
        original = getattr(owner, name)
        setattr(owner, name, make(original))
        stack.callback(setattr, owner, name, original)

    def resizing(original: Any) -> Any:
        def resize(tensor: torch.Tensor) -> None:
            original(tensor)
            for tracker in _active_trackers():
                tracker.note_storage(tensor, Category.weight_copies, weight=True)
        return resize

    def labelling(label: Category) -> Any:
        def make(original: Any) -> Any:
            def run(*args: Any, **kwargs: Any) -> Any:
                with contextlib.ExitStack() as labels:
                    for tracker in _active_trackers():
                        labels.enter_context(tracker.labelled(label))
                    return original(*args, **kwargs)
            return run
        return make

    for owner in (_fsdp_param, _fsdp_param_group):  # _fsdp_param_group imports alloc_storage by name
        patch(owner, "alloc_storage", resizing)
    patch(_fsdp_param, "free_storage", resizing)
    patch(_fsdp_param_group, "foreach_all_gather", labelling(Category.temporaries))
    patch(_fsdp_param_group, "foreach_reduce", labelling(Category.temporaries))
    patch(dist.Reducer, "_rebuild_buckets", labelling(Category.gradients))
