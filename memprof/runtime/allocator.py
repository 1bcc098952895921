"""Allocator-level peak of an unobserved CPU step: what ``max_memory_allocated`` reads on a GPU, for a CPU.

A CPU has no allocator peak counter, and memprof's tracker is a TorchDispatchMode, which changes what it observes
(autograd accumulates gradients out of place under one: sim.Graph.inplace_accumulation). This module runs the step
under ``torch.profiler`` with ``profile_memory=True`` instead: c10's CPU allocator reports every allocation and
free to the profiler (c10/core/CPUAllocator.cpp, ProfiledCPUMemoryReporter), whatever allocated it (tensors, autograd's
buffers, kernel workspaces), and the profiler dispatches nothing through Python, so autograd runs as in a plain loop.

Known limitations: CPU only (CUDA has max_memory_allocated); sizes are requested bytes (no allocator rounding or
caching: the default CPU allocator has none); storages alive before the step are not seen, so the peak is relative
to the start (add the live bytes then, e.g. ``live_storage_bytes``); memory freed by the profiler's own bookkeeping
is not involved (it allocates with malloc, not c10).
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import itertools
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch._C._autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from ..errors import DeviceUnavailableError

PHASE_PREFIX = "memprof.phase:"   # a phase: a record_function range
STEP_RANGE = "memprof.step"       # the measured step (after ``before_fn``)
MARK_PREFIX = "memprof.mark:"     # a sub-phase (step.backward_markers' blocks): from this instant to the next mark


@dataclass(frozen=True)
class AllocatorPeak:
    """Running sum of c10 CPU allocations during a step, relative to its start, in bytes."""

    peak_bytes: int                  # max of the running sum (0 when nothing was allocated)
    end_bytes: int                   # the sum when the step returned (live bytes the step left behind)
    phase_peak_bytes: dict[str, int] = field(default_factory=dict)  # per phase and sub-phase (``PhaseMarks``)

    def top_phase(self, names: Iterable[str]) -> str:
        """The one of ``names`` whose peak is highest (the first on a tie; a phase never opened counts -1)."""
        return max(names, key=lambda name: self.phase_peak_bytes.get(name, -1))


class PhaseMarks:
    """Duck-typed stand-in for ``MemoryTracker`` in ``step.run_step`` (and ``step.backward_markers``): labels each
    phase with a profiler ``record_function`` range and each sub-phase with an instant mark, so per-phase peaks can
    be read. No dispatch mode; ``backward_markers`` adds tensor hooks on the blocks' outputs, which read the
    gradient and return None (no accumulation changes)."""

    @contextlib.contextmanager
    def phase(self, phase: Any) -> Iterator[None]:
        with torch.profiler.record_function(PHASE_PREFIX + getattr(phase, "value", str(phase))):
            yield

    def set_phase(self, name: str) -> None:
        with torch.profiler.record_function(MARK_PREFIX + name):
            pass

    def register(self, _tensors: Iterable[torch.Tensor], _category: Any) -> None:
        pass

    def mark_activations(self) -> None:
        pass

    def mark_gradients(self, _model: Any) -> None:
        pass

    def mark_optimizer(self, _optimizer: Any) -> None:
        pass


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null: kineto writes "USDT ... profiler_start" / "profiler_stop" lines from C++ when
    a profile starts and stops (its USDT logger, not silenced by KINETO_LOG_LEVEL in torch 2.13); only those two
    calls are wrapped, so the step's own warnings still reach stderr."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to silence
        yield
        return
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def unobserved_peak(step_fn: Callable[[], Any], before_fn: Callable[[], Any] | None = None) -> AllocatorPeak:
    """Run ``step_fn()`` once under the profiler and return its allocation peak relative to the start.

    ``before_fn``: run first, inside the profile but outside the measured range, so that what it allocates and
    ``step_fn`` frees is seen freed. The profiler reports no free of a block allocated before it started
    (CPUAllocator.cpp: "Memory block of unknown size was allocated before the profiling started"), so a step that
    frees what an earlier step left (a loop's kept output) would otherwise read too high. The peak and end are then
    relative to the level when ``step_fn`` starts.

    Phases are the ``record_function`` ranges named ``PHASE_PREFIX + name`` that ``step_fn`` opens (``PhaseMarks``):
    each phase's peak is the running sum's maximum inside its range (relative to the step's start too). Sub-phases
    run from a ``MARK_PREFIX + name`` mark to the next mark or the end of the enclosing phase.

    Raises:
        DeviceUnavailableError: ``step_fn`` allocated on a device other than the CPU (use the CUDA counters there).
    """
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        if before_fn is not None:
            before_fn()
        with torch.profiler.record_function(STEP_RANGE):
            result = step_fn()
            del result  # what the step returns is freed inside the window (the caller can't hold it)
    finally:
        with _quiet_stderr():
            prof.stop()
    events = prof.profiler.kineto_results.events()
    deltas = []
    ranges = []
    marks = []
    step_start = 0
    for i, e in enumerate(events):
        name = e.name()
        if name == "[memory]":
            if e.device_type() != DeviceType.CPU:
                raise DeviceUnavailableError("unobserved_peak reads CPU allocations only; on CUDA read "
                                             "torch.cuda.max_memory_allocated")
            deltas.append((e.start_ns(), i, e.nbytes()))
        elif name.startswith(PHASE_PREFIX):
            ranges.append((name[len(PHASE_PREFIX):], e.start_ns(), e.end_ns()))
        elif name.startswith(MARK_PREFIX):
            marks.append((e.start_ns(), name[len(MARK_PREFIX):]))
        elif name == STEP_RANGE:
            step_start = e.start_ns()
    deltas.sort()  # by time; the event index keeps the recorded order of equal timestamps
    marks.sort()
    # a sub-phase ends at the next mark or at the end of the phase range it started in
    ends = [min([end for _, start, end in ranges if start <= t <= end] or [t])
            for t, _ in marks]
    sub = [(t, min(ends[i], marks[i + 1][0]) if i + 1 < len(marks) else ends[i], name)
           for i, (t, name) in enumerate(marks)]
    times = [t for t, _, _ in deltas]
    levels = list(itertools.accumulate(n for _, _, n in deltas))   # the running sum after each event
    first = bisect.bisect_left(times, step_start)                   # the measured step's first event
    base = levels[first - 1] if first > 0 else 0
    times, levels = times[first:], [lv - base for lv in levels[first:]]
    phase_peak: dict[str, int] = {}
    for name, start, end in ranges + [(n, a, b) for a, b, n in sub]:
        lo, hi = bisect.bisect_left(times, start), bisect.bisect_right(times, end)
        at_start = levels[lo - 1] if lo > 0 else 0   # what was live when the phase began counts too
        phase_peak[name] = max(phase_peak.get(name, at_start), at_start, *levels[lo:hi])
    peak = max([0, *levels])
    running = levels[-1] if levels else 0
    return AllocatorPeak(peak, running, phase_peak)


def unobserved_peak_bytes(step_fn: Callable[[], Any]) -> int:
    """The allocation peak of ``step_fn()`` relative to its start, in bytes (``unobserved_peak``)."""
    return unobserved_peak(step_fn).peak_bytes


def live_storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (each storage once, however many views share it)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())


def process_storage_bytes() -> int:
    """Bytes of every distinct CPU storage that a Python tensor in this process holds (the garbage collector's
    objects, after a collection): what was alive before a step whose engine keeps its buffers where no module or
    optimizer state lists them (DeepSpeed's flat groups, partitions and buckets). Storages held only from C++ are
    not seen."""
    gc.collect()
    tensors = []
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type == "cpu":
            tensors.append(obj)
    return live_storage_bytes(tensors)
