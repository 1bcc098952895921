"""One rank of a data-parallel measurement: ``torchrun ... -m memprof.runtime.rank_worker JOB`` (``runtime.ranks``
starts N of these through ``torch.distributed.run``).

Each rank reads the job (spec, setup, step counts) from the JSON file ``JOB``, joins the process group torchrun
describes in its environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``; gloo on
CPU, NCCL on CUDA with ``torch.cuda.set_device(LOCAL_RANK)``), and runs exactly the single-device measurement,
``harness.run_measurement``, with one hook: ``parallel.wrap_for_strategy`` after the method is applied and before
the optimizer is built. Warm-up, timed steps and the tracked step (``MemoryTracker``, which follows FSDP2's storage
resizes and DDP's buckets while a process group is up: on CPU the rank's peak, by category and phase) are the
single-device ones, and so is the CPU's unobserved step (torch.profiler memory events), except under DDP, whose
C++ gradient buckets it cannot count alive (``DDP_UNOBSERVED_NOTE``); on CUDA each rank reads its own
``max_memory_allocated`` and ``max_memory_reserved``. ZeRO runs in DeepSpeed's engine (``_deepspeed_measurement``: on a
CPU its CPU accelerator over the gloo group, the allocator-level peak of a step plus every storage alive before it).

Files, next to ``JOB``: ``rank<R>.pid`` at start (the launcher kills each rank's session by it on a timeout),
``rank<R>.log`` (this rank's stdout and stderr, from the first line on), ``rank<R>.json`` at the end:
``{"result": Measurement}`` or ``{"error": {"status", "message"}}``, written to a temporary name and renamed, so
a file that exists is whole. A rank that dies without one is recorded by the launcher from its log.

``MEMPROF_RANK_FAULT=<rank>:<raise|exit|hang>`` makes that rank fail right after joining the group (tests of the
launcher's failure path: an exception, ``os._exit(3)``, or a sleep until killed); nothing else reads it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

FAULT_ENV = "MEMPROF_RANK_FAULT"
DDP_UNOBSERVED_NOTE = ("DDP: no unobserved step: the Reducer's gradient buckets (C++, rebuilt after the first step) "
                       "are not among the storages counted alive before it, so its allocator-level peak would miss them")
TRACEBACK_TAIL_LINES = 12


def write_result(path: Path, payload: dict[str, Any]) -> None:
    """``payload`` as JSON at ``path``, atomically (a temporary name in the same folder, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, allow_nan=False))
    os.replace(tmp, path)


def _redirect_output(log: Path) -> None:
    """This rank's stdout and stderr to ``log`` (file descriptors 1 and 2: C++ and NCCL warnings land there too)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _fault(rank: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    target, _, kind = spec.partition(":")
    if not target.isdigit() or int(target) != rank:
        return
    if kind == "exit":
        os._exit(3)
    if kind == "hang":
        while True:
            time.sleep(1)
    raise RuntimeError(f"injected fault in rank {rank} ({FAULT_ENV})")


def _deepspeed_measurement(spec: Any, setup: Any, job: dict[str, Any], device: str, peft_config: Any) -> Any:
    """A ZeRO stage in DeepSpeed's engine: the model and method built as the harness builds them, then
    ``deepspeed.initialize(model, model_parameters, config=ranks.deepspeed_config(setup))``; each step
    ``engine(**batch).loss``, ``engine.backward(loss)``, ``engine.step()`` (DeepSpeed's training loop, docs
    "Getting Started": the engine owns loss scaling, gradient partitioning and the optimizer).

    The peak: on CUDA ``max_memory_allocated`` over the timed steps, as the harness reads it. On a CPU (DeepSpeed's
    CPU accelerator, ``DS_ACCELERATOR=cpu``, over the gloo group this rank joined) one more step under
    torch.profiler's memory events (``allocator.unobserved_peak``: every c10 allocation, the engine's own included)
    plus every CPU storage alive before it (``allocator.process_storage_bytes``: the engine's flat groups, fp32
    partitions, buckets and gradient partitions are held by the optimizer object, not by the module or a
    torch.optim state). No categorised breakdown: those buffers are outside the tracker's categories.
    """
    import statistics
    import warnings

    if device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is imported: it picks its accelerator once
    import deepspeed

    from ..records import Measurement, Phase, setup_row
    from . import probes
    from .allocator import PhaseMarks, process_storage_bytes, unobserved_peak
    from .build import apply_method, build_base_model, count_trainable, enable_checkpointing, synthetic_batch
    from .harness import _percentile, _real_tokens, keep_on_host, median_ci
    from .ranks import deepspeed_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = apply_method(build_base_model(spec, setup, device, job.get("pretrained")), spec, setup, peft_config)
        keep_on_host(model, device)
        if setup.grad_checkpointing:
            enable_checkpointing(model)
    model.train()
    trainable, total = count_trainable(model)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                          if p.requires_grad],
                                           config=deepspeed_config(setup))
    batch = synthetic_batch(spec, setup, engine.device)

    def step(marks: Any = None) -> None:  # K micro-batches; the engine steps the optimizer at the boundary
        phase = marks.phase if marks is not None else (lambda _p: contextlib.nullcontext())
        for _ in range(setup.grad_accum):
            with phase(Phase.forward):
                loss = engine(**batch).loss
            with phase(Phase.backward):
                engine.backward(loss)
            with phase(Phase.optimizer):
                engine.step()

    for _ in range(job["warmup_steps"]):
        step()
    if device == "cuda":
        probes.cuda_reset_peak()
    timer = probes.StepTimer(device)
    for _ in range(job["timed_steps"]):
        with timer.step():
            step()
    if device == "cuda":
        probes.cuda_synchronize()
    times = timer.times_s
    median = statistics.median(times)
    notes = [f"DeepSpeed {deepspeed.__version__} engine ({setup.parallel.describe()}); no tracked step (the "
             "engine's partitioned and bucketed buffers are outside the tracker's categories): no breakdown"]
    if device == "cuda":
        peak, phase, steady = probes.cuda_max_allocated_bytes(), None, probes.cuda_allocated_bytes()
    else:
        live: list[int] = []

        def prepare() -> None:  # one plain step in the profile (what the measured step frees of it is seen freed)
            step()
            live.append(process_storage_bytes())

        ap = unobserved_peak(lambda: step(PhaseMarks()), before_fn=prepare)
        peak, phase, steady = live[0] + ap.peak_bytes, ap.top_phase(p.value for p in Phase), live[0]
        notes.append("CPU: peak_bytes is the allocator-level peak of one more step (torch.profiler memory events) "
                     "plus every CPU storage alive before it, DeepSpeed's buffers included")
    return Measurement(
        spec_name=spec.name, setup_row=setup_row(spec, setup), status="ok", device=device,
        env=probes.env_info(device), total_params=total, trainable_params=trainable,
        peak_bytes=peak, reserved_bytes=probes.cuda_max_reserved_bytes() if device == "cuda" else None,
        steady_bytes=steady, rss_peak_bytes=probes.rss_peak_bytes(), peak_phase=phase,
        unobserved_peak_bytes=peak if device == "cpu" else None, unobserved_phase=phase,
        step_times_s=tuple(times), step_time_median_s=median, step_time_p10_s=_percentile(times, 0.1),
        step_time_p90_s=_percentile(times, 0.9), step_time_ci95_s=median_ci(times),
        samples_per_s=setup.grad_accum * setup.batch_size / median,
        tokens_per_s=setup.grad_accum * _real_tokens(batch, setup) / median,
        warmup_steps=job["warmup_steps"], timed_steps=len(times), extra={"notes": notes})


def main(argv: list[str] | None = None) -> int:
    job_path = Path((argv if argv is not None else sys.argv[1:])[0])
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    folder = job_path.parent
    _redirect_output(folder / f"rank{rank}.log")
    (folder / f"rank{rank}.pid").write_text(str(os.getpid()))
    from .worker import _die_with_parent

    _die_with_parent(None)  # torchrun's SIGKILL must not leave this rank running
    out = folder / f"rank{rank}.json"
    job = json.loads(job_path.read_text())
    try:
        import datetime

        import torch
        import torch.distributed as dist

        from ..config import ZERO_STRATEGIES, Strategy
        from ..errors import LibraryRefusalError, MemprofError
        from .build import load_peft_config
        from .harness import is_oom, run_measurement
        from .parallel import mixed_param_dtype, wrap_for_strategy
        from .runner import measurement_to_dict, setup_from_json, spec_from_json
    except BaseException as exc:  # noqa: BLE001 (report, whatever it is)
        write_result(out, {"error": {"status": "error", "message": f"cannot import the torch stack: {exc!r}"}})
        return 1
    try:
        spec, setup = spec_from_json(job["spec"]), setup_from_json(job["setup"])
        device = setup.device.value
        if job.get("cpu_threads"):
            torch.set_num_threads(int(job["cpu_threads"]))
        if device == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=job["collective_timeout_s"]))
        _fault(rank)
        peft_config = load_peft_config(job["peft_config"]) if job.get("peft_config") else None
        if setup.parallel.strategy in ZERO_STRATEGIES:
            m = _deepspeed_measurement(spec, setup, job, device, peft_config)
        else:
            ddp = setup.parallel.strategy is Strategy.ddp
            m = run_measurement(spec, setup, warmup_steps=job["warmup_steps"], timed_steps=job["timed_steps"],
                                breakdown=job["breakdown"], pretrained=job.get("pretrained"), peft_config=peft_config,
                                unobserved_cpu=not ddp,
                                wrap=lambda model: wrap_for_strategy(model, setup.parallel, device,
                                                                     param_dtype=mixed_param_dtype(setup)))
            if ddp and device == "cpu" and m.status == "ok":
                m.extra["notes"].append(DDP_UNOBSERVED_NOTE)
        write_result(out, {"result": measurement_to_dict(m)})
        return 0 if m.status == "ok" else 1  # an OOM rank ends the job: torchrun stops the ranks waiting for it
    except LibraryRefusalError as exc:  # the libraries refuse the run: a result, not a crash
        write_result(out, {"error": {"status": "n/a", "message": str(exc)}})
        return 1
    except MemprofError as exc:
        write_result(out, {"error": {"status": "error", "message": f"{type(exc).__name__}: {exc}"}})
        return 1
    except BaseException as exc:  # noqa: BLE001 (a crash becomes a recorded error, traceback in the log)
        traceback.print_exc()
        tail = "".join(traceback.format_exception(exc)).strip().splitlines()[-TRACEBACK_TAIL_LINES:]
        write_result(out, {"error": {"status": "oom" if is_oom(exc) else "error", "message": "\n".join(tail)[-4000:]}})
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
