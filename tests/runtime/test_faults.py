"""Faults around the measurement worker (issue 10, classes 5 and 6): a killed parent leaves no worker and no log
behind, and the worker never imports modules from the directory the user stands in."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("torch")

from tiny_configs import tiny_spec  # noqa: E402
from memprof.config import Device, Dtype, Method, RunSetup  # noqa: E402
from memprof.runtime.runner import measure  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CPU = {"batch_size": 2, "seq_len": 16, "dtype": Dtype.fp32, "device": Device.cpu}


def test_worker_ignores_modules_in_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A peft.py (and a torch.py) where the user runs memprof must not be imported by the worker."""
    marker = tmp_path / "imported"
    for name in ("peft", "torch", "transformers"):
        (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write('{name}\\n')\nraise SystemExit(9)\n")
    monkeypatch.chdir(tmp_path)
    m = measure(tiny_spec("gpt2"), RunSetup(method=Method.lora, **CPU), out_dir=None, warmup_steps=1, timed_steps=1)
    assert m.status == "ok", m.message
    assert not marker.exists()


def _workers(tag: str) -> list[int]:
    """Live worker processes whose environment carries ``tag``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if tag.encode() in (entry / "environ").read_bytes():
                cmd = (entry / "cmdline").read_bytes()
                if b"memprof.runtime.worker" in cmd:
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _kill_parent(parent: subprocess.Popen, sig: signal.Signals, tag: str) -> None:
    """Send ``sig`` to a parent and wait for it; no worker carrying ``tag`` may outlive it by more than 2 s."""
    parent.send_signal(sig)
    parent.wait(timeout=30)
    deadline = time.monotonic() + 2.0
    while _workers(tag) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _workers(tag) == [], "a worker outlived its parent by more than 2 s"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_parent_leaves_no_worker_and_no_log(tmp_path: Path, sig: signal.Signals) -> None:
    """A parent measuring a run that takes minutes is killed once its worker is running: the worker is gone
    within two seconds and no worker log is left in the temporary directory."""
    tag = f"MEMPROF_FAULT_TEST={uuid.uuid4().hex}"
    key, value = tag.split("=")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
        from tiny_configs import tiny_spec
        from memprof.config import Device, Dtype, Method, RunSetup
        from memprof.runtime.runner import measure
        # many timed steps at a size that takes a while: the worker is still running when the parent dies
        setup = RunSetup(method=Method.full, batch_size=64, seq_len=64, dtype=Dtype.fp32, device=Device.cpu)
        measure(tiny_spec("gpt2"), setup, out_dir=None, warmup_steps=1, timed_steps=10_000)
    """)
    env = {**os.environ, key: value, "TMPDIR": str(tmpdir)}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 120
        while not _workers(tag):
            assert parent.poll() is None, "the parent ended before its worker started"
            assert time.monotonic() < deadline, "no worker started"
            time.sleep(0.2)
        time.sleep(1.0)  # the worker is importing or stepping
        _kill_parent(parent, sig, tag)
        assert list(tmpdir.iterdir()) == [], "a worker log was left behind"
    finally:
        for pid in _workers(tag):
            os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()


def test_two_concurrent_sweeps_on_one_file_measure_each_case_once(tmp_path: Path) -> None:
    """Two `memprof compare --measure` processes started together on one results file: every case is measured
    once (the second sweep waits for the run in progress and reuses it), and both print every row."""
    import json

    from tiny_configs import GPT2

    config = tmp_path / "config.json"
    config.write_text(json.dumps(GPT2))
    out = tmp_path / "runs.jsonl"
    argv = [sys.executable, "-m", "memprof", "compare", str(config), "--methods", "full,lora,bitfit", "--measure",
            "--steps", "1", "--threads", "1", "-b", "2", "-s", "16", "--dtype", "fp32", "--out", str(out),
            "-f", "csv"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr.decode()[-2000:]
        assert stdout.decode().count("\n") == 4  # a header and the three runs
    records = [json.loads(line) for line in out.read_text().splitlines()]
    measured = [r["measurement"]["setup_row"]["method"] for r in records if r["schema"] == "memprof.measurement/1"]
    analytic = [r["setup"]["method"] for r in records if r.get("kind") == "analytic"]
    assert sorted(measured) == ["bitfit", "full", "lora"] and sorted(analytic) == ["bitfit", "full", "lora"]


def _left(tmpdir: Path) -> list[str]:
    """What is left in the temporary directory, torch's own compile cache folder (torchinductor_<user>, made by
    importing torch and kept on purpose) aside."""
    return [p.name for p in tmpdir.iterdir() if not p.name.startswith("torchinductor_")]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _measured(lines: list[str]) -> list[str]:
    import json

    return [json.loads(line)["measurement"]["setup_row"]["method"] for line in lines
            if '"memprof.measurement/1"' in line]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_sweep_killed_at_several_moments_resumes_with_nothing_lost_or_done_twice(tmp_path: Path) -> None:
    """One `compare --measure` sweep of four methods, killed three times at different moments: SIGKILL while the
    first worker runs (nothing recorded yet), SIGTERM while a later worker runs, SIGKILL the moment a record has
    been appended (between runs). After each kill no worker outlives the parent by 2 s, no log is left, and what
    was recorded stays byte for byte; the final rerun measures only what is missing: every case once."""
    import json

    from tiny_configs import GPT2

    config = tmp_path / "config.json"
    config.write_text(json.dumps(GPT2))
    out = tmp_path / "runs.jsonl"
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    tag = f"MEMPROF_FAULT_TEST={uuid.uuid4().hex}"
    key, value = tag.split("=")
    methods = ["full", "lora", "bitfit", "ia3"]
    argv = [sys.executable, "-m", "memprof", "compare", str(config), "--methods", ",".join(methods), "--measure",
            "--steps", "1", "--threads", "1", "-b", "2", "-s", "16", "--dtype", "fp32", "--out", str(out),
            "-f", "csv"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), key: value, "TMPDIR": str(tmpdir)}

    def start() -> subprocess.Popen:
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def wait_for(condition, proc: subprocess.Popen, what: str) -> None:  # noqa: ANN001
        deadline = time.monotonic() + 180
        while not condition():
            assert proc.poll() is None, f"the sweep ended before {what}: {proc.stderr.read().decode()[-800:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    def kill(proc: subprocess.Popen, sig: signal.Signals, before: list[str]) -> list[str]:
        _kill_parent(proc, sig, tag)
        assert _left(tmpdir) == [], "a worker log was left behind"
        after = _lines(out)
        assert after[:len(before)] == before, "a record written before the kill changed or was lost"
        assert len(_measured(after)) == len(set(_measured(after))), "a case was measured twice"
        return after

    try:
        # 1. SIGKILL while the first worker runs: nothing measured yet
        proc = start()
        wait_for(lambda: _workers(tag), proc, "the first worker")
        time.sleep(0.5)
        lines = kill(proc, signal.SIGKILL, _lines(out))
        assert _measured(lines) == []
        # 2. SIGTERM while a later worker runs (one case recorded)
        proc = start()
        wait_for(lambda: len(_measured(_lines(out))) >= 1 and _workers(tag), proc, "a record and the next worker")
        recorded = _lines(out)
        lines = kill(proc, signal.SIGTERM, recorded)
        assert len(_measured(lines)) == 1
        # 3. SIGKILL the moment the next record is appended (between two runs)
        proc = start()
        wait_for(lambda: len(_measured(_lines(out))) >= 2, proc, "a second record")
        lines = kill(proc, signal.SIGKILL, _lines(out))
        done = _measured(lines)
        assert 2 <= len(done) <= 3
        # the rerun measures only what is missing, and reuses everything recorded
        proc = start()
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr.decode()[-2000:]
        final = _lines(out)
        assert final[:len(lines)] == lines
        assert sorted(_measured(final)) == sorted(methods), "a case is missing or was measured twice"
        assert f"{len(done)} of {len(methods)} runs reused" in stderr.decode()
        assert stdout.decode().count("\n") == len(methods) + 1  # a header and every run
        assert _left(tmpdir) == []
    finally:
        for pid in _workers(tag):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_measurement_records_what_ran_beside_it() -> None:
    """Another memprof worker running during a measurement (a second sweep on another file) is counted in the
    record, with the load average against the CPU count, and the measurement says its timings are not the
    machine's. (Other suites on this machine may run workers too: the counts are checked against that.)"""
    from memprof.runtime.runner import concurrency_note, other_workers

    def run() -> object:
        return measure(tiny_spec("gpt2"), RunSetup(method=Method.lora, **CPU), out_dir=None, warmup_steps=1,
                       timed_steps=1, breakdown=False)

    alone = run()
    load = alone.extra["concurrent_load"]
    assert len(load["load_avg_1m"]) == 2 and load["cpu_count"] == os.cpu_count()
    assert (concurrency_note(alone) is None) == (load["other_workers"] == 0)
    before = other_workers()
    # a process that looks like a worker to anyone listing processes (its command line names the worker module)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "memprof.runtime.worker"])
    try:
        time.sleep(0.2)
        assert other_workers() >= 1 and (before > 0 or other_workers() == 1)
        beside = run()
    finally:
        other.kill()
        other.wait()
    others = beside.extra["concurrent_load"]["other_workers"]
    assert beside.status == "ok" and others >= 1
    assert f"{others} other memprof measurement{'s' if others > 1 else ''} ran on this machine at the same time" \
        in concurrency_note(beside)
