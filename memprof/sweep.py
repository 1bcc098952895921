"""Sweeps for ``memprof compare`` and the records behind ``memprof report``.

A sweep estimates every (precision, checkpointing, batch size, sequence length, method) run of one model, and
traces and measures it when asked. Results go to a JSONL file, one record per line, so a sweep resumes: runs
whose records are already there are not repeated. Record formats (``schema``):

- ``memprof.measurement/1``: written by ``runtime.runner.measure`` ({schema, written_at, measurement, setup,
  spec}); OOM, error and timeout runs are records too;
- ``memprof.estimate/1``: {schema, written_at, memprof_version, kind: analytic | traced, status: ok | n/a |
  error, message, versions (installed libraries), tested_versions (those the analytic scripts mirror),
  estimate: Estimate.to_row(), estimate_tracked (analytic only), setup, spec}.

Reading a file back (``rows_from_records``) recomputes the analytic estimates from the stored spec and setup
(they take microseconds and track the current estimator) and keeps stored traces and measurements.
Side effects: measurements run in worker processes (runtime.runner), traces import the torch stack.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from . import __version__
from .comparison import key_of
from .compat import TESTED_VERSIONS, installed_versions, known_refusal, refusal_error, require_torch_stack
from .config import METHOD_OPTIONS, OPTION_GROUPS, Method, RunSetup, check_timeout
from .resolve import parse_enum, resolve_setup
from .errors import (ConfigError, DependencyMissingError, DeviceUnavailableError, LibraryRefusalError, MemprofError,
                     UnsupportedModelError)
from .records import setup_row
from .spec import ModelSpec

ESTIMATE_SCHEMA = "memprof.estimate/1"
MEASUREMENT_SCHEMA = "memprof.measurement/1"  # runtime.runner.SCHEMA (not imported: keeps this module light)
RETRYABLE = ("error", "timeout")  # --retry-failed runs these again; an OOM is a result and stays
ProgressFn = Callable[[str, int, int], None]


# ---- planning ------------------------------------------------------------------------------------------------
def parse_list(text: str | None, what: str) -> tuple[str, ...]:
    """'a, b,a' -> ('a', 'b'): a comma-separated option, stripped and de-duplicated in order."""
    if text is None:
        return ()
    items = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not items:
        raise ConfigError(f"{what} must list at least one value")
    return items


def parse_ints(text: str | None, what: str) -> tuple[int, ...]:
    values = []
    for item in parse_list(text, what):
        try:
            values.append(int(item))
        except ValueError:
            raise ConfigError(f"{what} must be comma-separated integers, got {item!r}") from None
    return tuple(values)


def parse_precisions(text: str | None) -> tuple[tuple[str, str | None], ...]:
    """'fp32,bf16,fp16:amp,bf16:mixed' -> ((fp32, None), (bf16, None), (fp16, amp), (bf16, mixed))."""
    out = []
    for item in parse_list(text, "--precisions"):
        dtype, _, regime = item.partition(":")
        out.append((dtype, regime or None))
    return tuple(out)


def parse_switches(text: str | None, what: str) -> tuple[bool, ...]:
    """'off,on' -> (False, True)."""
    words = {"on": True, "off": False, "true": True, "false": False, "yes": True, "no": False}
    out = []
    for item in parse_list(text, what):
        if item.lower() not in words:
            raise ConfigError(f"{what} values must be on or off, got {item!r}")
        out.append(words[item.lower()])
    return tuple(out)


def plan_setups(methods: Sequence[str], overrides: Mapping[str, Any], *, batch_sizes: Sequence[int] = (),
                seq_lens: Sequence[int] = (), precisions: Sequence[tuple[str, str | None]] = (),
                checkpointing: Sequence[bool] = (), file: Path | None = None,
                defaults: Mapping[str, Any] | None = None,
                arms: Sequence[tuple[str, Mapping[str, Any]]] = ()) -> list[RunSetup]:
    """Every combination, methods innermost (so each full run precedes the PEFT runs compared with it).

    Args:
        methods: method names (full, lora, ...).
        arms: (name, run options of a peft config) pairs (``parse_arms``), after the methods: each arm's own
            method and options replace the shared option groups.
        overrides: resolve_setup overrides shared by all runs; method option groups (``lora``, ``adapter``,
            ...) are passed only to the methods that read them.
        batch_sizes, seq_lens, precisions ((dtype, regime or None)), checkpointing: the sweep's axes; an
            empty axis keeps the value of ``overrides`` (or the default).
        file: TOML run options (resolve_setup's precedence: defaults < file < overrides).
        defaults: a command's defaults, below the file (``memprof compare --measure`` on a CPU).

    Raises:
        ConfigError: an unknown method or an invalid option.
    """
    parsed = [parse_enum(Method, m, "method") for m in methods]
    if not parsed and not arms:
        raise ConfigError("give at least one method (--methods full,lora,...)")
    # an option group no swept method reads would be dropped silently: refuse it, as estimate does (an arm's
    # options come from its peft config, not from the flags)
    for group in OPTION_GROUPS:
        if overrides.get(group) is not None and not any(group in METHOD_OPTIONS[m] for m in parsed):
            users = ", ".join(m.value for m, o in METHOD_OPTIONS.items() if group in o)
            raise ConfigError(f"{group} options do not apply to the methods swept ({', '.join(m.value for m in parsed)});"
                              f" they apply to: {users}")
    setups = []
    runs: list[tuple[Method | None, Mapping[str, Any]]] = [(m, {}) for m in parsed] + [(None, o) for _, o in arms]
    for (dtype, regime), ckpt, b, s, (method, arm) in itertools.product(
            precisions or [(None, None)], checkpointing or [None], batch_sizes or [None], seq_lens or [None], runs):
        run = dict(overrides)
        for group in OPTION_GROUPS:
            if method is None or group not in METHOD_OPTIONS[method]:
                run.pop(group, None)
        run.update(arm)
        method = method or parse_enum(Method, arm["method"], "method")
        axes = {"method": method, "batch_size": b, "seq_len": s, "grad_checkpointing": ckpt, "dtype": dtype,
                "regime": regime}
        run.update({k: v for k, v in axes.items() if v is not None})
        setups.append(resolve_setup(file, run, defaults=defaults))
    return list(dict.fromkeys(setups))


# ---- records -------------------------------------------------------------------------------------------------
def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def failed_row(spec: ModelSpec, setup: RunSetup, kind: str, status: str, message: str) -> dict[str, Any]:
    """A row saying why an estimate, trace or measurement of this run does not exist."""
    return {"kind": kind, **setup_row(spec, setup), "status": status, "message": message}


def analytic_rows(spec: ModelSpec, setup: RunSetup) -> list[dict[str, Any]]:
    """The plain and the tracked analytic estimate as rows (with FLOPs per step), or one n/a row saying why."""
    from .analytic import estimate
    from .analytic.flops import step_flops

    try:
        plain = estimate(spec, setup).to_row()
        tracked = estimate(spec, setup, tracked=True).to_row()
    except (ConfigError, UnsupportedModelError) as exc:
        return [failed_row(spec, setup, "analytic", "n/a", str(exc))]
    try:
        plain["flops_per_step"] = step_flops(spec, setup).total_flops
    except MemprofError:
        plain["flops_per_step"] = None
    tracked["kind"] = "analytic-tracked"
    rule = known_refusal(spec, setup)
    if rule is not None:  # an estimate of a run the installed libraries refuse: say so beside the number
        plain["message"] = f"estimate only: {refusal_error(rule, spec, setup)}"
    return [plain, tracked]


def estimate_record(spec: ModelSpec, setup: RunSetup, kind: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A ``memprof.estimate/1`` record of the analytic rows or of a traced row."""
    from .runtime.runner import setup_to_json, spec_to_json

    first = rows[0]
    record: dict[str, Any] = {"schema": ESTIMATE_SCHEMA, "written_at": _now(), "memprof_version": __version__,
                              "kind": kind, "status": first.get("status", "ok"), "message": first.get("message"),
                              # the libraries installed when it was made; the analytic scripts mirror the tested ones
                              "versions": {k: v for k, v in installed_versions().items() if v},
                              "tested_versions": TESTED_VERSIONS}
    if record["status"] == "ok":
        record["estimate"] = {k: v for k, v in first.items() if k != "kind"}
        if len(rows) > 1:
            record["estimate_tracked"] = {k: v for k, v in rows[1].items() if k != "kind"}
    record.update(setup=setup_to_json(setup), spec=spec_to_json(spec))
    return record


def read_records(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """The records of memprof JSONL files (compare results or ``memprof measure`` output), in file order.

    Raises:
        ConfigError: a file that does not exist or holds no memprof records.
    """
    from .runtime.runner import read_measurements

    records = []
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"results file {path} does not exist")
        found = [r for r in read_measurements(path) if r.get("schema") in (ESTIMATE_SCHEMA, MEASUREMENT_SCHEMA)]
        if not found:
            raise ConfigError(f"{path} holds no memprof records (schema {ESTIMATE_SCHEMA} or {MEASUREMENT_SCHEMA})")
        records += found
    return records


def _decode(record: Mapping[str, Any]) -> tuple[ModelSpec, RunSetup]:
    from .runtime.runner import setup_from_json, spec_from_json

    try:
        return spec_from_json(record["spec"]), setup_from_json(record["setup"])
    except KeyError as exc:
        raise ConfigError(f"a {record.get('schema')} record has no {exc.args[0]}") from None
    except MemprofError:
        raise
    except (TypeError, ValueError, AttributeError) as exc:  # null or wrong-typed fields in a hand-edited file
        raise ConfigError(f"a {record.get('schema')} record is malformed ({type(exc).__name__}: "
                          f"{str(exc)[:100]})") from None


def record_row(record: Mapping[str, Any], spec: ModelSpec, setup: RunSetup) -> dict[str, Any] | None:
    """The stored row of a measurement or trace record (None for analytic records: they are recomputed)."""
    key = setup_row(spec, setup)  # recomputed: records written before a key column existed still join
    if record["schema"] == MEASUREMENT_SCHEMA:
        from .runtime.runner import measurement_from_dict

        try:
            row = measurement_from_dict(record["measurement"]).to_row()
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"a {MEASUREMENT_SCHEMA} record is malformed ({type(exc).__name__}: "
                              f"{str(exc)[:100]})") from None
        return {**_checked_numbers(row), **key}
    if record.get("kind") != "traced":
        return None
    if record.get("status", "ok") != "ok":
        return failed_row(spec, setup, "traced", record["status"], record.get("message") or "")
    if not isinstance(record.get("estimate"), Mapping):
        raise ConfigError(f"a traced {ESTIMATE_SCHEMA} record has no estimate table")
    return {**_checked_numbers(record["estimate"]), **key, "kind": "traced"}


def _checked_numbers(row: Mapping[str, Any]) -> Mapping[str, Any]:
    """A stored row whose sizes and times are what they claim: byte counts integers >= 0, seconds and rates finite
    numbers >= 0 (a hand-edited -537791128 peak would otherwise print as a saving of -537791128.0%)."""
    for name, value in row.items():
        if value is None:
            continue
        if name.endswith("_bytes") and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ConfigError(f"a stored record has {name} = {value!r}: byte counts are integers >= 0"[:200])
        if name.endswith(("_s", "_per_s", "_params")) and (
                not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf):
            raise ConfigError(f"a stored record has {name} = {value!r}: it must be a finite number >= 0"[:200])
    return row


def rows_from_records(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """compare() input rows from saved records: analytic estimates recomputed, traces and measurements as stored."""
    rows: list[dict[str, Any]] = []
    estimated: set[tuple] = set()
    for record in records:
        spec, setup = _decode(record)
        key = key_of(setup_row(spec, setup))
        if key not in estimated:
            estimated.add(key)
            rows += analytic_rows(spec, setup)
        row = record_row(record, spec, setup)
        if row is not None:
            rows.append(row)
    return rows


# ---- running -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MeasureOptions:
    """How each run is measured (``runtime.runner.measure`` arguments)."""

    warmup_steps: int = 1
    timed_steps: int | None = None        # None: until the median is known to +-5% (harness.run_timed)
    timeout_s: float | None = None        # per run; a run past it is recorded with status timeout
    cpu_threads: int | None = None        # torch intra-op threads in the worker (None: torch's default)
    memory_limit_bytes: int | None = None  # worker address-space cap (tests)
    isolate: bool = True                  # False: run in this process (no crash protection; tests)

    def __post_init__(self) -> None:
        check_timeout(self.timeout_s)
        if self.warmup_steps < 1 or (self.timed_steps is not None and self.timed_steps < 1):
            raise ConfigError(f"warm-up and timed steps must be >= 1, got {self.warmup_steps} and {self.timed_steps}")


@dataclass(frozen=True)
class SweepResult:
    rows: list[dict[str, Any]]   # compare() input rows of the planned runs
    planned: int                 # runs in the sweep
    reused: int                  # runs whose needed records were all in the results file already
    path: Path | None


def _index(path: Path | None) -> dict[tuple[str, tuple], list[Mapping[str, Any]]]:
    """Stored records of a results file by (kind, join key)."""
    index: dict[tuple[str, tuple], list[Mapping[str, Any]]] = {}
    if path is None or not path.is_file():
        return index
    from .runtime.runner import read_measurements

    stored = read_measurements(path)  # a torn last line (an interrupted write) is skipped with a warning
    ours = [r for r in stored if r.get("schema") in (ESTIMATE_SCHEMA, MEASUREMENT_SCHEMA)]
    if stored and not ours:  # someone else's JSONL: do not append memprof records to it
        raise ConfigError(f"{path} holds records that are not memprof's (schema {ESTIMATE_SCHEMA} or "
                          f"{MEASUREMENT_SCHEMA}); give another --out")
    for record in ours:  # an empty file, or one holding only a torn first record, resumes from nothing
        spec, setup = _decode(record)
        kind = "measured" if record["schema"] == MEASUREMENT_SCHEMA else record.get("kind", "analytic")
        index.setdefault((kind, key_of(setup_row(spec, setup))), []).append(record)
    return index


def _trace_row(spec: ModelSpec, setup: RunSetup) -> dict[str, Any]:
    require_torch_stack("tracing a sweep")
    from .runtime.trace import trace

    try:
        return trace(spec, setup).to_row()
    except LibraryRefusalError as exc:  # the run cannot happen with the installed libraries
        return failed_row(spec, setup, "traced", "n/a", str(exc))
    except MemprofError as exc:
        return failed_row(spec, setup, "traced", "error", f"{type(exc).__name__}: {exc}")


def _label(setup: RunSetup) -> str:
    regime = setup.effective_regime.value
    precision = setup.dtype.value if regime == setup.dtype.value else f"{setup.dtype.value} {regime}"
    return (f"{setup.method.value} b={setup.batch_size} s={setup.seq_len} {precision}"
            + (" ckpt" if setup.grad_checkpointing else ""))


def run_sweep(spec: ModelSpec, setups: Sequence[RunSetup], *, path: Path | None = None, trace: bool = False,
              measure: MeasureOptions | None = None, retry_failed: bool = False,
              progress: ProgressFn | None = None) -> SweepResult:
    """Estimate every run (and trace / measure it), reusing and appending records of ``path``.

    Args:
        spec: the model.
        setups: the runs (``plan_setups``); measured runs need ``device`` cpu or cuda set.
        path: JSONL results file (``.jsonl``); None keeps nothing (no resume; measuring needs a file).
        trace: also trace each run on fake tensors (torch stack, in this process).
        measure: also measure each run in a worker process, with these options.
        retry_failed: run again measurements recorded with status error or timeout (an OOM stays a result).
        progress: ``progress(description, runs_done, runs_total)``, also during a measurement.

    Returns:
        The rows of every planned run for ``compare.compare`` and how many runs were reused.

    Raises:
        ConfigError: measuring without a results file, or a path that is not ``.jsonl``.
        DependencyMissingError: tracing without the torch stack.
    """
    if path is not None and path.suffix != ".jsonl":
        raise ConfigError(f"the results file must end in .jsonl, got {path}")
    if measure is not None and path is None:
        raise ConfigError("measuring needs a results file (--out FILE.jsonl)")
    if path is not None:
        from .outputs import check_writable

        check_writable(path, "--out")
    index = _index(path)
    rows: list[dict[str, Any]] = []
    reused = 0
    for done, setup in enumerate(setups):
        label = _label(setup)
        if progress is not None:
            progress(label, done, len(setups))
        with _claimed(path, lambda: progress(f"{label}: waiting for another sweep on {path}", done, len(setups))
                      if progress else None) as changed:
            if changed:  # another sweep appended meanwhile: its runs are reused, not redone
                index = _index(path)
            r, fresh = _sweep_one(spec, setup, label, done, len(setups), index, path, trace, measure, retry_failed,
                                  progress)
        rows += r
        reused += not fresh
    if progress is not None:
        progress("done", len(setups), len(setups))
    return SweepResult(rows=rows, planned=len(setups), reused=reused, path=path)


@contextlib.contextmanager
def _claimed(path: Path | None, waiting: Callable[[], Any]) -> Iterator[bool]:
    """Hold an exclusive lock on the results file while one run is looked up, computed and appended, so two
    sweeps on one file never run the same case twice: the second waits for the run in progress, then finds it
    recorded. Yields whether the file changed since it was last read (by size). POSIX flock; elsewhere no lock."""
    if path is None:
        yield False
        return
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    try:
        import fcntl
    except ImportError:  # pragma: no cover (Windows)
        yield True
        return
    with open(path, "rb") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            waited = False
        except BlockingIOError:
            waiting()
            fcntl.flock(handle, fcntl.LOCK_EX)
            waited = True
        try:
            size = path.stat().st_size
            yield waited or size != _SEEN_SIZES.get(path)
            _SEEN_SIZES[path] = path.stat().st_size
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_SEEN_SIZES: dict[Path, int] = {}  # results file -> its size when this process last released it


def _sweep_one(spec: ModelSpec, setup: RunSetup, label: str, done: int, total: int,
               index: Mapping[tuple[str, tuple], list[Mapping[str, Any]]], path: Path | None, trace: bool,
               measure: MeasureOptions | None, retry_failed: bool, progress: ProgressFn | None
               ) -> tuple[list[dict[str, Any]], bool]:
    """One run of a sweep: its rows, and whether anything was computed and recorded now."""
    from .runtime.runner import append_jsonl

    rows: list[dict[str, Any]] = []
    key = key_of(setup_row(spec, setup))
    analytic = analytic_rows(spec, setup)
    rows += analytic
    fresh = False  # something was computed and recorded now (not reused from the file)
    if path is not None and ("analytic", key) not in index:
        append_jsonl(path, estimate_record(spec, setup, "analytic", analytic))
        fresh = True
    if analytic[0].get("status") == "n/a":  # the method does not apply: nothing to trace or measure
        return rows, fresh
    if trace:
        if progress is not None:
            progress(f"{label}: tracing", done, total)
        row, ran = _traced_row(spec, setup, index.get(("traced", key), []), path)
        rows.append(row)
        fresh = fresh or ran
    if measure is not None:
        row, ran = _measure_row(spec, setup, index.get(("measured", key), []), path, measure, retry_failed,
                                lambda phase, step, n: progress(f"{label}: {phase} {step}/{n}", done, total)
                                if progress else None)
        rows.append(row)
        fresh = fresh or ran
    return rows, fresh


def _traced_row(spec: ModelSpec, setup: RunSetup, stored: Sequence[Mapping[str, Any]], path: Path | None
                ) -> tuple[dict[str, Any], bool]:
    """The trace row of a run: stored, or traced now and appended (second item: traced now)."""
    if stored:
        return record_row(stored[-1], spec, setup), False  # type: ignore[return-value]
    from .runtime.runner import append_jsonl

    row = _trace_row(spec, setup)
    if path is not None:
        append_jsonl(path, estimate_record(spec, setup, "traced", [row]))
    return row, True


def _measure_row(spec: ModelSpec, setup: RunSetup, stored: Sequence[Mapping[str, Any]], path: Path | None,
                 options: MeasureOptions, retry_failed: bool, progress: ProgressFn) -> tuple[dict[str, Any], bool]:
    """The measurement row of a run: stored, not applicable, or measured now (second item: measured now)."""
    from .runtime.runner import check_measurable, measure  # no torch import: the worker imports it

    try:  # refused before any process starts: QLoRA / 8-bit AdamW on CPU, prefix tuning + checkpointing, and what
        check_measurable(setup, spec)  # the installed library versions refuse
    except (ConfigError, DeviceUnavailableError, LibraryRefusalError) as exc:
        return failed_row(spec, setup, "measured", "n/a", str(exc)), False
    ok = [r for r in stored if r["measurement"].get("status") == "ok"]
    latest = (ok or list(stored))[-1:] if stored else []
    if latest and not (retry_failed and latest[0]["measurement"].get("status") in RETRYABLE):
        return record_row(latest[0], spec, setup), False  # type: ignore[return-value]
    assert path is not None
    try:
        m = measure(spec, setup, out_dir=path.parent, name=path.stem, timeout_s=options.timeout_s,
                    warmup_steps=options.warmup_steps, timed_steps=options.timed_steps,
                    memory_limit_bytes=options.memory_limit_bytes, cpu_threads=options.cpu_threads,
                    isolate=options.isolate, progress=progress)
    except (DeviceUnavailableError, DependencyMissingError) as exc:  # refused before anything ran
        return failed_row(spec, setup, "measured", "n/a", str(exc)), False
    return m.to_row(), True



def step_rows(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The per-step rows of StepProfiler / MemprofCallback records (``memprof report --steps``), by rank, step.

    Raises:
        ConfigError: no record comes from the step profiler.
    """
    rows = []
    for record in records:
        m = record.get("measurement") or {}
        extra = m.get("extra") or {}
        if extra.get("source") != "step profiler":
            continue
        row = m.get("setup_row") or {}
        phases = extra.get("phase_peaks") or {}
        rows.append({"model": row.get("model"), "method": row.get("method"), "device": m.get("device"),
                     "rank": extra.get("rank", 0), "step": extra.get("step"), "batch_size": row.get("batch_size"),
                     "seq_len": row.get("seq_len"), "micro_batches": extra.get("micro_batches"),
                     "real_tokens": extra.get("real_tokens"), "peak_bytes": m.get("peak_bytes"),
                     "estimate_peak_bytes": extra.get("estimate_peak_bytes"), "drift_frac": extra.get("drift_frac"),
                     "forward_peak_bytes": phases.get("forward"), "backward_peak_bytes": phases.get("backward"),
                     "optimizer_peak_bytes": phases.get("optimizer"), "reserved_bytes": m.get("reserved_bytes"),
                     "step_time_s": m.get("step_time_median_s"), "tokens_per_s": m.get("tokens_per_s")})
    if not rows:
        raise ConfigError("no per-step records here (they come from memprof.integrations: MemprofCallback, "
                          "StepProfiler); drop --steps to report compare/measure records")
    return sorted(rows, key=lambda r: (r["rank"], r["step"] or 0))
