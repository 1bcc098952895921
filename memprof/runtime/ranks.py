"""Data-parallel measurement: N real ranks on this machine, one Measurement row per rank and one for the job.

``measure_ranks`` writes the job (spec, setup, step counts) to a JSON file in a fresh temporary folder and starts

    python -m torch.distributed.run --standalone --nproc-per-node N -m memprof.runtime.rank_worker JOB

in its own session, with that folder as working directory (a ``memprof`` link there to this package: the ranks
import the memprof that launched them, and nothing else from where the user stands). Each rank runs the
single-device measurement with the model wrapped for the strategy (``rank_worker``) and leaves ``rank<R>.json``.

Rows: one Measurement per rank (``rank`` = R, ``world_size`` = N), then the job's row (``rank`` None,
``world_size`` N): the rank with the highest peak (what must fit on every device), with every rank's peak in
``extra["rank_peaks_bytes"]``, the step time of the slowest rank and the job's throughput (N micro-batches per
step); status ok only when every rank is ok. All are appended to ``<out_dir>/<name>.jsonl``, the job row last
(``comparison.join`` keeps the last row of a run: the job's max).

A rank that raises, runs out of memory or dies is a row with its status and the tail of its own log; torchrun then
stops the other ranks (torch.distributed.elastic's agent: a failed worker ends the group when ``max_restarts`` is
0), and they are rows saying so. On a timeout the launcher sends torchrun SIGTERM (its agent forwards it to the
ranks), then SIGKILL to torchrun's process group and to each rank's own session (torchrun starts every worker with
``start_new_session=True``: elastic/multiprocessing/subprocess_handler), found by the pid file the rank wrote; each
rank also dies with torchrun (``worker._die_with_parent``). No rank outlives the call.

Every rank runs the same fixed number of timed steps (5 when not given): the single-device adaptive stop would
let ranks stop at different steps and leave the others waiting in a collective. This module imports no torch
(except ``torch.cuda.device_count`` to check GPUs when the device is CUDA).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import (ZERO_BUFFERS, ZERO_STRATEGIES, ZERO_SWITCHES, Device, Dtype, Loop, Offload, Optimizer, Regime,
                      RunSetup, check_timeout, with_method_defaults)
from ..ds_input import AUTOCAST_NAMES
from ..errors import ConfigError, DependencyMissingError, DeviceUnavailableError
from ..outputs import check_writable
from ..records import Measurement, setup_row
from ..spec import ModelSpec
from ..units import fmt_bytes_auto
from .runner import (SCHEMA, STDERR_TAIL_LINES, append_jsonl, check_measurable, check_record_name, concurrent_load,
                     default_name, measure, measurement_from_dict, measurement_to_dict, setup_to_json, spec_to_json)

ProgressFn = Callable[[str, int, int], None]
RANK_MODULE = "memprof.runtime.rank_worker"
RANK_TIMED_STEPS = 5             # every rank runs the same count (no adaptive stop across ranks)
COLLECTIVE_TIMEOUT_S = 600.0     # a rank waiting on a dead peer errors after this (torchrun usually stops it first)
TERM_GRACE_S = 5.0               # SIGTERM -> SIGKILL
DEEPSPEED_HINT = "pip install 'memprof[deepspeed]'"


@dataclass(frozen=True)
class RankedRun:
    """A data-parallel measurement: a row per rank (rank order) and the job's row (max over ranks)."""

    ranks: tuple[Measurement, ...]
    job: Measurement

    @property
    def rows(self) -> tuple[Measurement, ...]:
        return (*self.ranks, self.job)


# ---- options and checks ----------------------------------------------------------------------------------------
def parallel_overrides(nproc: int | None = None, strategy: str | None = None, world_size: int | None = None,
                       offload: str | None = None, shard_size: int | None = None) -> dict[str, Any]:
    """``memprof measure``'s --nproc / --strategy / --world-size / --offload / --shard-size as resolve_setup
    overrides: the world size is --nproc (every rank runs here), --world-size only restates it.

    Raises:
        ConfigError: --world-size differs from --nproc; --strategy (or --offload, --shard-size) with one rank.
    """
    if nproc is not None and world_size is not None and nproc != world_size:
        raise ConfigError(f"--world-size {world_size} differs from --nproc {nproc}: a measured run starts every rank "
                          "on this machine (estimate other world sizes with memprof estimate --world-size)")
    n = nproc if nproc is not None else world_size
    given = {"strategy": strategy, "offload": offload, "shard_size": shard_size}
    if n is not None and n < 1:
        raise ConfigError(f"--nproc must be >= 1, got {n}")
    if (n is None or n == 1) and any(v is not None for v in given.values()):
        flag = next(f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None)
        raise ConfigError(f"{flag} needs --nproc N with N > 1 ranks (--nproc 1 is the single-device run)")
    out = {"world_size": n, **given} if n is not None and n > 1 else {}
    return {k: v for k, v in out.items() if v is not None}


def is_ranked(setup: RunSetup) -> bool:
    """Whether ``setup`` is measured as N > 1 ranks (a world size of 1 is the single-device run)."""
    return setup.parallel is not None and setup.parallel.world_size > 1


def deepspeed_config(setup: RunSetup) -> dict[str, Any]:
    """The DeepSpeed config of a ZeRO run (DeepSpeed docs, "DeepSpeed Configuration JSON"): ``zero_optimization``
    with the stage and ``offload_optimizer`` / ``offload_param`` (device cpu) as ``setup.parallel.offload`` says,
    ``bf16`` / ``fp16`` enabled for the mixed regime (DeepSpeed keeps half weights and fp32 master partitions),
    ``train_micro_batch_size_per_gpu`` = b, ``gradient_accumulation_steps`` = K, AdamW at the harness's lr, and
    ``gradient_clipping`` 1.0 for the Trainer loop (its max_grad_norm).

    Raises:
        ConfigError: not a ZeRO strategy; a regime or optimizer DeepSpeed's engine does not run as memprof's loop does.
    """
    par = setup.parallel
    if par is None or par.strategy not in ZERO_STRATEGIES:
        raise ConfigError("a DeepSpeed config is for --strategy zero1, zero2 or zero3")
    regime = setup.effective_regime
    if regime is Regime.pure:
        raise ConfigError("DeepSpeed's engine has no pure half regime (it keeps fp32 master weights beside half "
                          "ones); measure ZeRO with --regime mixed, --regime amp or --dtype fp32")
    if setup.optimizer is not Optimizer.adamw:
        raise ConfigError(f"measured ZeRO runs DeepSpeed's AdamW, not {setup.optimizer.value}; use --optimizer adamw")
    zero: dict[str, Any] = {"stage": int(par.strategy.value[-1])}
    for name, key, *_ in (*ZERO_BUFFERS, *ZERO_SWITCHES):
        if getattr(par, name) is not None:
            zero[key] = getattr(par, name)
    if par.offload in (Offload.optimizer, Offload.params):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if par.offload is Offload.params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": setup.batch_size, "gradient_accumulation_steps": setup.grad_accum,
        "zero_optimization": zero, "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}},
        "steps_per_print": 1 << 30, "wall_clock_breakdown": False,
    }
    if regime is Regime.mixed:
        config["fp16" if setup.dtype is Dtype.fp16 else "bf16"] = {"enabled": True}
    elif regime is Regime.amp:  # fp32 parameters, the forward under torch.autocast (runtime/torch_autocast.py)
        config["torch_autocast"] = {"enabled": True, "dtype": AUTOCAST_NAMES[setup.dtype.value]}
    if setup.loop is Loop.trainer:
        config["gradient_clipping"] = 1.0
    return config


def check_ranks(setup: RunSetup) -> None:
    """Refuse, before any process starts, a data-parallel run that cannot be measured here.

    Raises:
        ConfigError: several nodes; offload with an FSDP or DDP strategy (not wrapped yet); ZeRO offload on a CPU
            (nothing to move); a ZeRO setup DeepSpeed's engine does not run (``deepspeed_config``).
        DependencyMissingError: a ZeRO strategy without DeepSpeed.
        DeviceUnavailableError: fewer GPUs than ranks.
    """
    par = setup.parallel
    if par is None:
        return
    if par.nodes > 1:
        raise ConfigError(f"memprof measure runs every rank on this machine: --nodes {par.nodes} is for estimates")
    if par.strategy in ZERO_STRATEGIES:
        if importlib.util.find_spec("deepspeed") is None:
            raise DependencyMissingError(f"measuring ZeRO needs DeepSpeed: {DEEPSPEED_HINT} (memprof estimate "
                                         f"--strategy {par.strategy.value} works without it)")
        if setup.device is not Device.cuda and par.offload is not Offload.none:
            raise ConfigError(f"offload {par.offload.value} on a CPU moves nothing (host and device memory are one): "
                              "measure ZeRO offload with --device cuda; memprof estimate models it")
        deepspeed_config(setup)
    elif par.offload is not Offload.none:
        raise ConfigError(f"offload {par.offload.value} with {par.strategy.value} is not measured (FSDP's CPUOffload "
                          "is not wrapped); memprof estimate models it")
    if setup.device is Device.cuda:
        import torch  # noqa: PLC0415 (only to count GPUs)

        count = torch.cuda.device_count()
        if count < par.world_size:
            raise DeviceUnavailableError(f"--nproc {par.world_size} needs {par.world_size} GPUs, one per rank; this "
                                         f"machine has {count}")


def ranked_setup(setup: RunSetup) -> RunSetup:
    """The setup ``memprof measure`` runs: a world of one rank is the single-device run (``parallel`` dropped, so
    its record joins the single-device rows); a data-parallel one is checked (``check_ranks``).

    Raises:
        as ``check_ranks``.
    """
    if not is_ranked(setup):
        return setup.on_one_device()
    check_ranks(setup)
    return setup


def measure_job(spec: ModelSpec, setup: RunSetup, **options: Any) -> tuple[Measurement, RankedRun | None]:
    """``runner.measure`` for one device, ``measure_ranks`` for several (``options``: the keywords they share).

    Returns:
        The Measurement to show (one device's, or the job's row) and the RankedRun (None for one device).
    """
    if not is_ranked(setup):
        return measure(spec, setup, **options), None
    run = measure_ranks(spec, setup, **options)
    return run.job, run


def rank_note(run: RankedRun | None) -> str | None:
    """'rank peaks: 0 630.37 KiB (backward), 1 ...; shown: the highest': the ranks under the job's row (None for one
    device)."""
    if run is None:
        return None
    parts = [f"{m.rank} {fmt_bytes_auto(m.peak_bytes)} ({m.peak_phase})" if m.status == "ok" else f"{m.rank} {m.status}"
             for m in run.ranks]
    return f"rank peaks: {', '.join(parts)}; shown: the highest, each rank's row is in the record file"


def torchrun_argv(nproc: int, job_path: Path) -> list[str]:
    """The launch command: torch's own launcher (``torch.distributed.run``, what ``torchrun`` runs), one node."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "--max-restarts", "0", "-m", RANK_MODULE, str(job_path)]


# ---- launching ----------------------------------------------------------------------------------------------------
def _rank_pids(folder: Path, nproc: int) -> list[int]:
    pids = []
    for rank in range(nproc):
        try:
            pids.append(int((folder / f"rank{rank}.pid").read_text()))
        except (OSError, ValueError):
            continue
    return pids


def _is_rank(pid: int) -> bool:
    """Whether ``pid`` is still one of our rank workers (not a pid the system reused)."""
    try:
        return RANK_MODULE.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return not Path("/proc/self").exists() and _alive(pid)  # no /proc: trust the pid file


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def stop_job(proc: subprocess.Popen, folder: Path, nproc: int, grace_s: float = TERM_GRACE_S) -> None:
    """End torchrun and every rank: SIGTERM to torchrun (its agent stops the workers), then SIGKILL to its process
    group and to each rank's session (``os.killpg`` on the pid each rank wrote)."""
    groups = []
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace_s)
        except (OSError, subprocess.TimeoutExpired):
            groups.append(proc.pid)  # still there: its whole process group goes
    for pgid in (*groups, *(pid for pid in _rank_pids(folder, nproc) if _is_rank(pid))):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:  # already gone
            pass
    proc.wait()


def _tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _launch(nproc: int, folder: Path, timeout_s: float | None) -> tuple[int | None, bool]:
    """Run torchrun to the end (or the timeout); returns (its exit status, whether it timed out)."""
    link = folder / "memprof"
    link.symlink_to(Path(__file__).resolve().parents[1], target_is_directory=True)
    with open(folder / "torchrun.log", "wb") as log:
        proc = subprocess.Popen(torchrun_argv(nproc, folder / "job.json"), cwd=folder, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
            return rc, False
        except subprocess.TimeoutExpired:
            return None, True
        finally:
            stop_job(proc, folder, nproc)  # whatever happened: nothing of the job is left running


def _payload(folder: Path, rank: int) -> dict[str, Any] | None:
    try:
        return json.loads((folder / f"rank{rank}.json").read_text())
    except (OSError, ValueError):  # none: the rank died (or was stopped) before writing it
        return None


def _rank_row(rank: int, nproc: int, payload: dict[str, Any] | None, folder: Path, base: dict[str, Any],
              rc: int | None, timed_out: bool, timeout_s: float | None, failed: Sequence[int]) -> Measurement:
    """Rank ``rank``'s Measurement from its result file, or from how the job ended and the rank's log."""
    if payload is not None and "result" in payload:
        m = measurement_from_dict(payload["result"])
        return dataclasses.replace(m, rank=rank, world_size=nproc)
    if payload is not None:
        status, message = payload["error"]["status"], payload["error"]["message"]
    elif timed_out:
        status, message = "timeout", f"timed out after {timeout_s:g} s; every rank was stopped"
    else:
        others = [r for r in failed if r != rank]
        status = "error"
        message = (f"rank {rank} ended without a result (torchrun exit status {rc}"
                   + (f"; it stops every rank once rank {others[0]} failed" if others else "") + ")")
        tail = _tail(folder / f"rank{rank}.log") or _tail(folder / "torchrun.log")
        message += f"\n{tail}" if tail else ""
    return Measurement(status=status, message=message, rank=rank, world_size=nproc, **base)


def _headline(message: str | None) -> str:
    """A message's telling line: a traceback's last (the exception), else the first."""
    lines = [line for line in (message or "").splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[-1] if lines[0].startswith((" ", "Traceback")) else lines[0]


def job_row(ranks: Sequence[Measurement], base: dict[str, Any]) -> Measurement:
    """The job's row: ok when every rank is; then the rank with the highest peak (``extra["peak_rank"]``, every
    rank's in ``extra["rank_peaks_bytes"]``), the slowest rank's median step time (ranks wait for each other in
    the collectives) and the job's throughput, N times a rank's micro-batch per step. Reserved and unobserved
    peaks are each the highest over ranks too."""
    nproc = len(ranks)
    bad = [m for m in ranks if m.status != "ok"]
    if bad:
        status = next((m.status for m in bad if m.status == "oom"), bad[0].status)
        message = "; ".join(f"rank {m.rank}: {m.status}: {_headline(m.message)}" for m in bad)
        return Measurement(status=status, message=message, world_size=nproc, **base)
    top = max(ranks, key=lambda m: m.peak_bytes or 0)
    slowest = max(ranks, key=lambda m: m.step_time_median_s or 0)
    scale = nproc * (top.step_time_median_s or 0) / (slowest.step_time_median_s or 1)
    reserved = [m.reserved_bytes for m in ranks if m.reserved_bytes is not None]
    unobserved = max(ranks, key=lambda m: m.unobserved_peak_bytes or 0)  # CPU: each rank's allocator-level peak
    notes = [*top.extra.get("notes", []), f"job row: the highest per-rank peak of {nproc} ranks (rank {top.rank}); "
             f"step time of the slowest rank; throughput of the job ({nproc} x a rank's micro-batch per step)"]
    return dataclasses.replace(
        top, rank=None, world_size=nproc, reserved_bytes=max(reserved) if reserved else None,
        unobserved_peak_bytes=unobserved.unobserved_peak_bytes, unobserved_phase=unobserved.unobserved_phase,
        step_time_median_s=slowest.step_time_median_s, step_time_p10_s=slowest.step_time_p10_s,
        step_time_p90_s=slowest.step_time_p90_s, step_time_ci95_s=slowest.step_time_ci95_s,
        step_times_s=slowest.step_times_s,
        samples_per_s=top.samples_per_s * scale if top.samples_per_s else None,
        tokens_per_s=top.tokens_per_s * scale if top.tokens_per_s else None,
        extra={**top.extra, "notes": notes, "peak_rank": top.rank,
               "rank_peaks_bytes": [m.peak_bytes for m in ranks]})


def measure_ranks(spec: ModelSpec, setup: RunSetup, *, out_dir: str | Path | None = "measurements",
                  name: str | None = None, timeout_s: float | None = None, warmup_steps: int = 1,
                  timed_steps: int | None = None, breakdown: bool = True, pretrained: str | None = None,
                  peft_config: str | Path | None = None, cpu_threads: int | None = None,
                  progress: ProgressFn | None = None) -> RankedRun:
    """Measure ``setup.parallel.world_size`` ranks of ``spec`` under ``setup`` on this machine (torchrun) and
    append a row per rank and the job's row to ``<out_dir>/<name>.jsonl``.

    Args:
        spec, setup: the run; ``setup.parallel`` names the strategy and the world size (> 1); setup.device cpu
            (gloo) or cuda (NCCL, a GPU per rank).
        timeout_s: stop every rank after this many seconds; the ranks without a result are status "timeout".
        timed_steps: timed steps per rank (default RANK_TIMED_STEPS: ranks must agree on the count).
        out_dir, name, warmup_steps, breakdown, pretrained, peft_config, cpu_threads: as ``runner.measure``.
        progress: ``progress("ranks", done, 1)`` at the start and at the end.

    Returns:
        The RankedRun (rows with status ok | oom | error | timeout | n/a).

    Raises:
        ConfigError, DependencyMissingError, DeviceUnavailableError: ``check_ranks`` and ``runner.check_measurable``.
    """
    setup = with_method_defaults(setup)
    if not is_ranked(setup):
        raise ConfigError("measure_ranks needs setup.parallel with a world size > 1 (runner.measure runs one device)")
    check_timeout(timeout_s)
    check_record_name(name)
    if out_dir is not None:
        check_writable(out_dir, "--out", folder=True)
    if warmup_steps < 1 or (timed_steps is not None and timed_steps < 1):
        raise ConfigError(f"warm-up and timed steps must be >= 1, got {warmup_steps} and {timed_steps}")
    check_measurable(setup, spec, peft_config)
    check_ranks(setup)
    nproc = setup.parallel.world_size
    job = {"spec": spec_to_json(spec), "setup": setup_to_json(setup), "warmup_steps": warmup_steps,
           "timed_steps": timed_steps or RANK_TIMED_STEPS, "breakdown": breakdown,
           "pretrained": str(Path(pretrained).resolve()) if pretrained and Path(pretrained).exists() else pretrained,
           "peft_config": str(Path(peft_config).resolve()) if peft_config else None, "cpu_threads": cpu_threads,
           "collective_timeout_s": timeout_s or COLLECTIVE_TIMEOUT_S}
    base = dict(spec_name=spec.name, setup_row=setup_row(spec, setup), device=setup.device.value,
                warmup_steps=warmup_steps, timed_steps=job["timed_steps"])
    load = concurrent_load()
    if progress is not None:
        progress("ranks", 0, 1)
    with tempfile.TemporaryDirectory(prefix="memprof-ranks-") as tmp:
        folder = Path(tmp)
        (folder / "job.json").write_text(json.dumps(job))
        rc, timed_out = _launch(nproc, folder, timeout_s)
        payloads = [_payload(folder, rank) for rank in range(nproc)]
        failed = [rank for rank, p in enumerate(payloads) if p is not None and "error" in p]
        rows = [_rank_row(rank, nproc, p, folder, base, rc, timed_out, timeout_s, failed)
                for rank, p in enumerate(payloads)]
    if progress is not None:
        progress("ranks", 1, 1)
    env = next((m.env for m in rows if m.env is not None), None)
    load = concurrent_load(load)
    rows = [dataclasses.replace(m, env=m.env or env, extra={**m.extra, "concurrent_load": load}) for m in rows]
    job_m = job_row(rows, {**base, "env": env})
    run = RankedRun(tuple(rows), dataclasses.replace(job_m, extra={**job_m.extra, "concurrent_load": load}))
    if out_dir is not None:
        path = Path(out_dir) / f"{name or default_name(spec)}.jsonl"
        for m in run.rows:
            append_jsonl(path, {"schema": SCHEMA, "written_at": _now(), "measurement": measurement_to_dict(m),
                                "setup": setup_to_json(setup), "spec": spec_to_json(spec)})
    return run


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

