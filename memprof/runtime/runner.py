"""Isolation and persistence for measurements: one fresh worker process per run, results appended to JSONL.

``measure`` sends the job (the ModelSpec with its hf_config and source, and the full RunSetup) as JSON to
``python -m memprof.runtime.worker``, reads progress and the result over a pipe, and turns an out-of-memory,
a crash (non-zero exit, signal) or a timeout into a recorded ``Measurement`` (status oom | error | timeout,
with the last lines of the worker's output) rather than a lost session. A fresh process also gives each run
a clean allocator peak and peak RSS.

Each result is one JSON line appended to ``<out_dir>/<name>.jsonl`` with a single ``os.write`` on a file
opened ``O_APPEND``, then fsync'd, so concurrent writers never interleave and an interrupted write leaves at
worst a truncated last line, which ``read_measurements`` skips with a warning. This module imports no torch;
the worker does.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..config import (AdapterSpec, AdapterVariant, AttnImpl, Device, Dtype, IA3Spec, Loop, LoraSpec, Method, Optimizer,
                      OptimizerImpl, Offload, Overheads, ParallelSpec, PromptLearningSpec, QuantSpec, Regime, RunSetup, Strategy, TokensSpec, ZeroGrad,
                      check_runnable, check_timeout, with_method_defaults)
from ..compat import check_supported
from ..errors import ConfigError, DeviceUnavailableError
from ..outputs import check_writable, printable
from ..records import EnvInfo, Measurement, MemoryBreakdown, setup_row
from ..spec import Family, ModelSpec, Task

ProgressFn = Callable[[str, int, int], None]
SCHEMA = "memprof.measurement/1"
STDERR_TAIL_LINES = 20
WORKER_MODULE = "memprof.runtime.worker"

# ---- JSON helpers --------------------------------------------------------------------------------------------
_SETUP_ENUMS: dict[str, type[Enum]] = {"method": Method, "dtype": Dtype, "regime": Regime, "optimizer": Optimizer,
                                       "attn_impl": AttnImpl, "device": Device, "loop": Loop,
                                       "optimizer_impl": OptimizerImpl, "zero_grad": ZeroGrad}
_SETUP_GROUPS: dict[str, type] = {"lora": LoraSpec, "quant": QuantSpec, "adapter": AdapterSpec, "ia3": IA3Spec,
                                  "prompt": PromptLearningSpec, "trainable_tokens": TokensSpec, "overheads": Overheads,
                                  "parallel": ParallelSpec}
_GROUP_ENUMS: dict[str, type[Enum]] = {"variant": AdapterVariant, "strategy": Strategy, "offload": Offload}


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def setup_to_json(setup: RunSetup) -> dict[str, Any]:
    """Every RunSetup field as JSON values (enums by value, option groups as objects, tuples as lists)."""
    return _plain(setup)


def _group_from_json(cls: type, name: str, values: Mapping[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(sorted(unknown))} in '{name}'; known: {', '.join(sorted(known))}")
    kwargs = {k: _GROUP_ENUMS[k](v) if k in _GROUP_ENUMS else (tuple(v) if isinstance(v, list) else v)
              for k, v in values.items()}
    return cls(**kwargs)


def setup_from_json(data: Mapping[str, Any]) -> RunSetup:
    """Inverse of ``setup_to_json``: ``setup_from_json(setup_to_json(s)) == s``.

    Raises:
        ConfigError: an unknown key, an unknown enum value or an invalid value.
    """
    known = {f.name for f in dataclasses.fields(RunSetup)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown setup option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    kwargs: dict[str, Any] = {}
    try:
        for key, value in data.items():
            if value is None or key not in (*_SETUP_ENUMS, *_SETUP_GROUPS):
                kwargs[key] = value
            elif key in _SETUP_ENUMS:
                kwargs[key] = _SETUP_ENUMS[key](value)
            else:
                kwargs[key] = _group_from_json(_SETUP_GROUPS[key], key, value)
        return RunSetup(**kwargs)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"invalid setup: {exc}") from None


def spec_to_json(spec: ModelSpec) -> dict[str, Any]:
    """Every ModelSpec field, hf_config and source included (the worker rebuilds the spec exactly)."""
    out = {f.name: _plain(getattr(spec, f.name)) for f in dataclasses.fields(spec)}
    return out


def spec_from_json(data: Mapping[str, Any]) -> ModelSpec:
    """Inverse of ``spec_to_json``.

    Raises:
        ConfigError: unknown keys or invalid sizes.
    """
    known = {f.name for f in dataclasses.fields(ModelSpec)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown model spec key(s) {', '.join(sorted(unknown))}")
    kwargs = dict(data)
    try:
        kwargs["family"] = Family(kwargs["family"])
        if "task" in kwargs:
            kwargs["task"] = Task(kwargs["task"])
        if "layer_types" in kwargs:  # a JSON list: the spec keeps a tuple (it is hashed)
            kwargs["layer_types"] = tuple(str(t) for t in kwargs["layer_types"])
        return ModelSpec(**kwargs)
    except (KeyError, ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"invalid model spec: {exc}") from None


def measurement_to_dict(m: Measurement) -> dict[str, Any]:
    return _plain(m)


def measurement_from_dict(data: Mapping[str, Any]) -> Measurement:
    """A Measurement from ``measurement_to_dict`` output (keys it does not know are ignored)."""
    known = {f.name for f in dataclasses.fields(Measurement)}
    kwargs = {k: v for k, v in data.items() if k in known}
    if kwargs.get("breakdown") is not None:
        kwargs["breakdown"] = MemoryBreakdown.from_dict(kwargs["breakdown"])
    if kwargs.get("env") is not None:
        env_known = {f.name for f in dataclasses.fields(EnvInfo)}
        kwargs["env"] = EnvInfo(**{k: v for k, v in kwargs["env"].items() if k in env_known})
    kwargs["step_times_s"] = tuple(kwargs.get("step_times_s") or ())
    if kwargs.get("step_time_ci95_s") is not None:
        kwargs["step_time_ci95_s"] = tuple(kwargs["step_time_ci95_s"])
    return Measurement(**kwargs)


# ---- JSONL persistence -----------------------------------------------------------------------------------------
def default_name(spec: ModelSpec) -> str:
    """File stem for a model: ``FacebookAI/roberta-base`` -> ``FacebookAI_roberta-base``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", spec.name).strip("._") or "model"


def check_record_name(name: str | None) -> None:
    """A record file's stem stays inside its folder: letters, digits, '.', '_', '-', no path, at most 200."""
    if name is not None and (not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}", name)):
        raise ConfigError(f"--name must be a file name stem (letters, digits, '.', '_', '-'; no path; at most 200 "
                          f"characters), got {str(name)[:60]!r}")


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line with a single write on an O_APPEND descriptor, then fsync.

    If the file ends in a truncated line (an earlier interrupted write), a newline is written first so the
    new record stays on a line of its own.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    data = b"\n" + data
        written = os.write(fd, data)
        while written < len(data):  # only on a full disk or a signal; keep the line whole if we can
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def read_measurements(path: str | Path) -> list[dict[str, Any]]:
    """The records of a measurements JSONL file. Lines that are not valid JSON objects (a truncated last line
    after an interrupted write) are skipped with a warning."""
    records = []
    lines = Path(path).read_bytes().split(b"\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            where = "truncated last line" if number >= len(lines) - 1 else f"invalid line {number}"
            warnings.warn(f"{path}: skipping {where} ({len(line)} bytes)", stacklevel=2)
            continue
        records.append(printable(record))  # a record from someone else's file prints no escape sequences
    return records


# ---- the worker process ------------------------------------------------------------------------------------------
def _tail(log: Any, lines: int = STDERR_TAIL_LINES) -> str:
    try:
        log.seek(0)
        text = log.read().decode(errors="replace")
    except (OSError, ValueError):
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def worker_argv() -> list[str]:
    """``python -c BOOT``: runs memprof.runtime.worker with the current directory taken off ``sys.path`` (a
    ``peft.py`` or ``torch.py`` where the user stands must not be imported) and memprof's own source directory
    appended, so a checkout that is not installed still works without shadowing anything installed."""
    root = str(Path(__file__).resolve().parents[2])
    boot = ("import sys, runpy; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
            f"sys.path.append({root!r}); runpy.run_module({WORKER_MODULE!r}, run_name='__main__', alter_sys=True)")
    return [sys.executable, "-c", boot]


def other_workers() -> int | None:
    """How many memprof measurement workers (of any sweep, any user) run on this machine now; None where /proc
    cannot tell (not Linux)."""
    proc = Path("/proc")
    if not (proc / "self").exists():
        return None
    count = 0
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if WORKER_MODULE.encode() in (entry / "cmdline").read_bytes():
                count += 1
        except OSError:  # gone, or not ours to read
            continue
    return count


def concurrent_load(before: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What ran beside a measurement, sampled when its worker starts and when it ends: other memprof workers and
    the 1-minute load average against the CPU count. Timings taken under load are slower than the machine's."""
    workers = other_workers()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if before is None:
        return {"other_workers": workers, "load_avg_1m": [load], "cpu_count": os.cpu_count()}
    counts = [c for c in (before["other_workers"], workers) if c is not None]
    return {**before, "other_workers": max(counts) if counts else None, "load_avg_1m": [*before["load_avg_1m"], load]}


def concurrency_note(m: Measurement) -> str | None:
    """A note when other memprof measurements ran beside ``m`` (its step times are then not the machine's)."""
    others = (m.extra.get("concurrent_load") or {}).get("other_workers")
    if not others:
        return None
    return (f"{others} other memprof measurement{'s' if others > 1 else ''} ran on this machine at the same time; "
            "step times and throughput are slower than the machine's")


def _handle(line: bytes, out: dict[str, Any], progress: ProgressFn | None) -> str | None:
    """Apply one worker message to ``out``; returns a progress description for messages that are progress."""
    try:
        msg = json.loads(line)
    except ValueError:
        return None
    if "progress" in msg:
        phase, step, total = msg["progress"]
        if progress is not None:
            progress(phase, step, total)
        return f"{phase} {step}/{total}"
    if "env" in msg:
        out["env"] = msg["env"]
    elif "result" in msg:
        out.update(status=msg["result"]["status"], result=msg["result"])
    elif "error" in msg:
        out.update(status=msg["error"]["status"], message=msg["error"]["message"])
    return None


def memory_available_bytes() -> int | None:
    """What the kernel lets this machine (or container) use: the cgroup v2 limit, else MemTotal (Linux)."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            return int(limit)
    except OSError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


OOM_KILL_RSS_FRAC = 0.8  # a SIGKILLed worker that had reached this share of the memory available was OOM-killed


def _killed_message(name: str, peak_rss_bytes: int | None, available: int | None) -> tuple[str, str]:
    """Status and message of a worker that died of a signal; SIGKILL is what the kernel OOM killer sends, so it
    is an OOM when the worker's peak RSS had reached most of the memory available, with those figures."""
    if name != "SIGKILL":
        return "error", f"worker killed by {name}"
    if peak_rss_bytes is None or not available:
        return "error", "worker killed by SIGKILL (the kernel OOM killer sends SIGKILL; its peak RSS is unknown)"
    share = peak_rss_bytes / available
    evidence = (f"peak RSS {peak_rss_bytes / 2**30:.2f} GiB of {available / 2**30:.2f} GiB available "
                f"({100 * share:.0f}%)")
    if share >= OOM_KILL_RSS_FRAC:
        return "oom", f"likely out of memory: worker killed by SIGKILL, what the kernel OOM killer sends; {evidence}"
    return "error", (f"worker killed by SIGKILL (the kernel OOM killer sends SIGKILL, but its {evidence} was far "
                     f"from the limit: probably killed by someone else)")


def _reap(proc: subprocess.Popen, deadline: float | None) -> tuple[int, int | None]:
    """Wait for the worker and return its exit status and peak RSS in bytes (wait4's rusage; Linux: KiB)."""
    while True:
        try:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:  # already reaped
            return proc.wait(), None
        if pid:
            rc = os.waitstatus_to_exitcode(status)
            proc.returncode = rc
            return rc, int(usage.ru_maxrss) * (1 if sys.platform == "darwin" else 1024)
        if deadline is not None and time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, 0)
        time.sleep(0.02)


def _run_child(argv: Sequence[str], job: Mapping[str, Any], timeout_s: float | None,
               progress: ProgressFn | None, available_bytes: int | None = None) -> dict[str, Any]:
    """Run one worker; returns {"status", "message", "result", "env"} from its messages and exit."""
    read_fd, write_fd = os.pipe()
    log = tempfile.TemporaryFile(prefix="memprof-worker-")  # unlinked at once: no log outlives the run
    proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                            pass_fds=(write_fd,), start_new_session=True)
    os.close(write_fd)
    out: dict[str, Any] = {"status": None, "message": None, "result": None, "env": None}
    last = "start"
    try:
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps({**job, "result_fd": write_fd, "parent_pid": os.getpid()}).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        buffer = b""
        with selectors.DefaultSelector() as sel:
            sel.register(read_fd, selectors.EVENT_READ)
            while True:
                if deadline is not None:
                    wait = deadline - time.monotonic()
                    if wait <= 0 or not sel.select(wait):
                        os.killpg(proc.pid, signal.SIGKILL)  # the worker's own process group
                        proc.wait()
                        out.update(status="timeout", message=f"timed out after {timeout_s:g} s (last: {last})")
                        return out
                chunk = os.read(read_fd, 65536)
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    last = _handle(line, out, progress) or last
        rc, peak_rss = _reap(proc, None if deadline is None else max(deadline, time.monotonic() + 0.1))
        if out["status"] is None:
            status = "error"
            if rc < 0:
                status, why = _killed_message(signal.Signals(-rc).name, peak_rss,
                                              available_bytes or memory_available_bytes())
            else:
                why = f"worker exited with status {rc} without a result"
            tail = _tail(log)
            out.update(status=status, message=why + (f" during {last}" if last != "start" else "")
                       + (f"\n{tail}" if tail else ""))
        return out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        out.update(status="timeout", message=f"timed out after {timeout_s:g} s waiting for the worker to exit")
        return out
    finally:
        os.close(read_fd)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def check_measurable(setup: RunSetup, spec: ModelSpec | None = None, peft_config: str | Path | None = None) -> None:
    """Refuse, before any process starts, what cannot run on the chosen device (or, given the model, with the
    installed library versions; given a ``--peft-config`` too, what peft would refuse when applying it).

    Raises:
        ConfigError: a combination no training step runs as configured (config.check_runnable).
        DeviceUnavailableError: QLoRA or 8-bit AdamW (bitsandbytes CUDA kernels) on a CPU.
        LibraryRefusalError: the installed transformers / peft refuse this method on this model.
        DependencyMissingError: the peft config's options need a package that is not installed.
    """
    check_runnable(setup)
    if spec is not None:
        from .build import check_peft_config, check_positions, resolve_attention_of_class  # noqa: PLC0415

        resolve_attention_of_class(spec, setup)  # an explicit --attn sdpa the model class lacks: refused now

        if peft_config is None:
            check_supported(spec, setup)
        else:  # the worker would fail on it after seconds of imports: say so now
            check_peft_config(spec, setup, peft_config)
        check_positions(spec, setup)
    if setup.device is Device.cpu and setup.method is Method.qlora:
        raise DeviceUnavailableError("QLoRA needs bitsandbytes' 4-bit CUDA kernels; measure it on a GPU "
                                     "(--device cuda), or use --method lora on CPU (memprof trace emulates QLoRA)")
    if setup.device is Device.cpu and setup.optimizer is Optimizer.adamw_8bit:
        raise DeviceUnavailableError("adamw-8bit (bitsandbytes) runs on CUDA only; use --optimizer adamw on CPU")


def measure(spec: ModelSpec, setup: RunSetup, *, out_dir: str | Path | None = "measurements", name: str | None = None,
            timeout_s: float | None = None, isolate: bool = True, warmup_steps: int = 1, timed_steps: int | None = None,
            breakdown: bool = True, pretrained: str | None = None, peft_config: str | Path | None = None,
            memory_limit_bytes: int | None = None, cpu_threads: int | None = None,
            progress: ProgressFn | None = None) -> Measurement:
    """Measure ``spec`` under ``setup`` in a fresh worker process and append the result to JSONL.

    Args:
        spec: the model (any spec ``memprof.hub`` resolves; its hf_config travels to the worker).
        setup: the run; ``setup.device`` must be cpu or cuda.
        out_dir: folder of ``<name>.jsonl``; None writes nothing.
        name: file stem; default: the model name with path separators replaced (``default_name``).
        timeout_s: kill the worker after this many seconds and record status "timeout" (isolate only).
        isolate: False runs in this process (no timeout, no crash protection; errors raise).
        warmup_steps, timed_steps, breakdown, pretrained: as ``harness.run_measurement``.
        peft_config: path of a peft config JSON to apply instead of the method's own.
        memory_limit_bytes: address space (RLIMIT_AS) the worker may add after importing the torch stack,
            Linux only; a run needing more ends with status "oom". Meant for tests.
        cpu_threads: torch intra-op threads in the worker (default: torch's choice).
        progress: ``progress(phase, step, total)``; phases start | build | warmup | timed | breakdown.

    Returns:
        The Measurement (status ok | oom | error | timeout), also appended to the JSONL file with the full
        setup and spec as provenance.

    Raises:
        ConfigError: timeout or memory limit without isolation; invalid step counts.
    """
    setup = with_method_defaults(setup)
    check_timeout(timeout_s)
    check_record_name(name)
    if out_dir is not None:
        check_writable(out_dir, "--out", folder=True)  # before the run, not after it
    if pretrained is not None:
        from ..hub import check_pretrained

        check_pretrained(pretrained)
    check_measurable(setup, spec, peft_config)
    if warmup_steps < 1 or (timed_steps is not None and timed_steps < 1):
        raise ConfigError(f"warm-up and timed steps must be >= 1, got {warmup_steps} and {timed_steps}")
    if not isolate:
        if timeout_s is not None or memory_limit_bytes is not None:
            raise ConfigError("a timeout or memory limit needs isolate=True (a worker process)")
        from .build import load_peft_config  # noqa: PLC0415 (torch stack only on this path)
        from .harness import run_measurement

        m = run_measurement(spec, setup, warmup_steps=warmup_steps, timed_steps=timed_steps, breakdown=breakdown,
                            pretrained=pretrained, peft_config=load_peft_config(peft_config) if peft_config else None,
                            progress=progress)
    else:
        job = {"spec": spec_to_json(spec), "setup": setup_to_json(setup), "warmup_steps": warmup_steps,
               "timed_steps": timed_steps, "breakdown": breakdown, "pretrained": pretrained,
               "peft_config": str(peft_config) if peft_config else None, "memory_limit_bytes": memory_limit_bytes,
               "cpu_threads": cpu_threads}
        load = concurrent_load()
        outcome = _run_child(worker_argv(), job, timeout_s, progress)
        load = concurrent_load(load)
        if outcome["result"] is not None:
            m = measurement_from_dict(outcome["result"])
        else:
            env = outcome["env"]
            m = Measurement(spec_name=spec.name, setup_row=setup_row(spec, setup), status=outcome["status"],
                            device=setup.device.value, message=outcome["message"],
                            env=EnvInfo(**env) if env else None, warmup_steps=warmup_steps, timed_steps=timed_steps or 0)
        m = dataclasses.replace(m, extra={**m.extra, "concurrent_load": load})
    if out_dir is not None:
        record = {"schema": SCHEMA, "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "measurement": measurement_to_dict(m), "setup": setup_to_json(setup), "spec": spec_to_json(spec)}
        append_jsonl(Path(out_dir) / f"{name or default_name(spec)}.jsonl", record)
    return m
