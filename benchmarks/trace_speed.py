"""How fast is the traced estimator? Issue 4's target: Llama-3.2-3B full fine-tuning, pure bf16, batch 4,
sequence 768, traced in 10 s or less on a 2-core machine. Prints the times and their ratio to the target, not
pass/fail.

    python benchmarks/trace_speed.py [--runs 3] [--threads 1]

Each run is a fresh ``memprof.runtime.trace.trace`` call (``layers="auto"``: depths 2 and 3 traced on fake
CUDA tensors and extrapolated to 28 blocks). The first run also pays one-off costs (transformers' lazy
imports, peft, first dispatch through FakeTensorMode) and is reported separately; so is a fresh process
(``python -m memprof trace ...``: interpreter start-up, importing torch / transformers / peft, the trace), which
is what a user waits for at the command line.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
TARGET_S = 10.0
MODEL, OPTIONS = "Llama-3.2-3B", {"method": "full", "dtype": "bf16", "batch_size": 4, "seq_len": 768}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="warm runs after the first")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--no-cli", action="store_true", help="skip the cold-process CLI timing")
    args = parser.parse_args()

    start = time.perf_counter()
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    import peft

    from memprof import __version__
    from memprof.resolve import resolve_setup
    from memprof.hub import resolve_spec
    from memprof.runtime.trace import trace
    from memprof.units import fmt_bytes

    import_s = time.perf_counter() - start
    print(f"memprof {__version__}, Python {platform.python_version()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, peft {peft.__version__}; {platform.platform()}; {_cpu()}, "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    spec, _ = resolve_spec(MODEL)
    setup = resolve_setup(None, OPTIONS)
    what = f"{MODEL} full fine-tuning, pure bf16, b=4, s=768, traced on fake CUDA tensors"
    start = time.perf_counter()
    est = trace(spec, setup)
    first_s = time.perf_counter() - start
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        trace(spec, setup)
        times.append(time.perf_counter() - start)
    warm = statistics.median(times) if times else first_s
    print(f"{what}: peak {fmt_bytes(est.peak_bytes)} in {est.peak_phase.value}; {est.notes[0]}")
    print(f"imports (torch, transformers, peft, memprof): {import_s:.2f} s")
    print(f"first trace in this process: {first_s:.2f} s = {first_s / TARGET_S:.2f} x the {TARGET_S:.0f} s target")
    if times:
        print(f"later traces: median {warm:.2f} s (min {min(times):.2f}, max {max(times):.2f}, {len(times)} runs) "
              f"= {warm / TARGET_S:.2f} x the target")
    if not args.no_cli:
        argv = [sys.executable, "-m", "memprof", "trace", MODEL, "--method", "full", "--dtype", "bf16", "-b", "4",
                "-s", "768", "-f", "json"]
        # bytecode caching on, as in any normal install (some sandboxes turn it off); the first run writes the
        # .pyc files and warms the file cache and is dropped, as benchmarks/estimate_speed.py does
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["OMP_NUM_THREADS"] = str(args.threads)
        cli = []
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True, cwd=ROOT, env=env)
            cli.append(time.perf_counter() - start)
        cli_s = statistics.median(cli[1:])
        print(f"fresh process `memprof trace {MODEL} --method full --dtype bf16 -b 4 -s 768 -f json`: median "
              f"{cli_s:.2f} s of {len(cli) - 1} runs = {cli_s / TARGET_S:.2f} x the target (Python start-up, imports "
              f"and the trace)")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
