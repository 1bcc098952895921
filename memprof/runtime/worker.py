"""The measurement worker: ``python -m memprof.runtime.worker`` reads one job (JSON) on stdin, runs
``harness.run_measurement`` and reports over the file descriptor the job names, one JSON object per line:
``{"env": ...}``, ``{"progress": [phase, step, total]}``, then ``{"result": ...}`` or ``{"error": ...}``.

Started by ``runner.measure`` (``runner.worker_argv``: the current directory is not on ``sys.path``, so a stray
``peft.py`` there is never imported); its stdout and stderr go to an unnamed temporary file whose tail becomes the
message of a crash (nothing is left behind, whatever happens to either process); it dies with its parent.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import traceback
from typing import Any, Callable

TRACEBACK_TAIL_LINES = 12


def _emitter(fd: int) -> Callable[[dict[str, Any]], None]:
    stream = os.fdopen(fd, "w", buffering=1)

    def emit(message: dict[str, Any]) -> None:
        stream.write(json.dumps(message, allow_nan=False) + "\n")
        stream.flush()

    return emit


def _cap_address_space(spec: Any, setup: Any, limit_bytes: int) -> None:
    """RLIMIT_AS = address space now + ``limit_bytes``, after everything the run imports is imported: the
    model is built once on the meta device (imports the modeling and peft code, no memory) and one matmul
    starts the intra-op thread pool (thread stacks and malloc arenas take address space)."""
    import torch

    from .build import apply_method, build_base_model
    from .probes import virtual_memory_bytes

    apply_method(build_base_model(spec, setup, "meta"), spec, setup)
    torch.ones(64, 64) @ torch.ones(64, 64)
    now = virtual_memory_bytes()
    if now is None:
        return  # not Linux: no cap
    cap = now + limit_bytes
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def _die_with_parent(parent_pid: int | None) -> None:
    """The worker runs in its own session (a timeout kills its whole group), so a killed parent would leave it
    running: on Linux the kernel sends it SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG); a parent that
    died before that was set is caught by the pid check. Elsewhere the parent's pipe closing ends it (EPIPE)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def main() -> int:
    job = json.loads(sys.stdin.read())
    _die_with_parent(job.get("parent_pid"))
    emit = _emitter(int(job["result_fd"]))
    try:
        import torch

        from ..errors import LibraryRefusalError, MemprofError
        from .build import load_peft_config
        from .harness import is_oom, run_measurement
        from .probes import env_info
        from .runner import measurement_to_dict, setup_from_json, spec_from_json
    except BaseException as exc:  # noqa: BLE001 (report, whatever it is)
        emit({"error": {"status": "error", "message": f"cannot import the torch stack: {type(exc).__name__}: {exc}"}})
        return 1
    try:
        spec = spec_from_json(job["spec"])
        setup = setup_from_json(job["setup"])
        if job.get("cpu_threads"):
            torch.set_num_threads(int(job["cpu_threads"]))
        emit({"env": env_info(setup.device.value).as_dict()})
        emit({"progress": ["start", 1, 1]})
        peft_config = load_peft_config(job["peft_config"]) if job.get("peft_config") else None
        if job.get("memory_limit_bytes"):
            _cap_address_space(spec, setup, int(job["memory_limit_bytes"]))
        m = run_measurement(spec, setup, warmup_steps=job["warmup_steps"], timed_steps=job["timed_steps"],
                            breakdown=job["breakdown"], pretrained=job.get("pretrained"), peft_config=peft_config,
                            progress=lambda phase, step, total: emit({"progress": [phase, step, total]}))
        emit({"result": measurement_to_dict(m)})
        return 0
    except LibraryRefusalError as exc:  # the run cannot happen with these library versions: a result, not a crash
        emit({"error": {"status": "n/a", "message": str(exc)}})
        return 1
    except MemprofError as exc:
        emit({"error": {"status": "error", "message": f"{type(exc).__name__}: {exc}"}})
        return 1
    except BaseException as exc:  # noqa: BLE001 (a crash becomes a recorded error, traceback in the log)
        traceback.print_exc()
        tail = "".join(traceback.format_exception(exc)).strip().splitlines()[-TRACEBACK_TAIL_LINES:]
        emit({"error": {"status": "oom" if is_oom(exc) else "error", "message": "\n".join(tail)[-4000:]}})
        return 1


if __name__ == "__main__":
    sys.exit(main())
