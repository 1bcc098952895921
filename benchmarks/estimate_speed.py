"""How fast is `memprof estimate`? Prints ratios, not pass/fail (issue 2 targets: CLI < 0.3 s over a bare
Python start; >= 20,000 estimates/s through the Python API).

    python benchmarks/estimate_speed.py [--runs 10] [--n 20000]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import subprocess
import sys
import time


def wall_s(argv: list[str], runs: int) -> list[float]:
    # bytecode caching on, as in any normal install (pip compiles .pyc files; some sandboxes turn it off)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    times = []
    for _ in range(runs + 1):  # the first run writes the .pyc files and warms the file cache; dropped
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()

    from memprof import __version__
    from memprof.resolve import resolve_setup
    from memprof.analytic import estimate
    from memprof.hub import resolve_spec

    print(f"memprof {__version__}, python {platform.python_version()}, {platform.platform()}, CPU only")
    cli = [sys.executable, "-m", "memprof", "estimate", "--params", "3e9", "--dtype", "fp16", "--method", "adapter"]
    bare = [sys.executable, "-c", "pass"]
    t_cli, t_bare = wall_s(cli, args.runs), wall_s(bare, args.runs)
    extra = statistics.median(t_cli) - statistics.median(t_bare)
    print(f"CLI `memprof estimate --params 3e9 --dtype fp16 --method adapter`: median {statistics.median(t_cli):.3f} s "
          f"(min {min(t_cli):.3f}), `python -c pass`: median {statistics.median(t_bare):.3f} s -> "
          f"{extra:.3f} s more (target < 0.3 s)")

    spec, _ = resolve_spec(None, params=3e9)
    base = resolve_setup(None, {"method": "adapter", "dtype": "fp16"})
    start = time.perf_counter()
    estimate(spec, base)
    cold = time.perf_counter() - start
    setups = [dataclasses.replace(base, batch_size=1 + i % 64, seq_len=128 + i % 4096) for i in range(args.n)]
    start = time.perf_counter()
    for s in setups:
        estimate(spec, s)
    warm = args.n / (time.perf_counter() - start)
    print(f"Python API: first estimate of a model/method (replay + cache) {cold * 1000:.1f} ms; then "
          f"{warm:,.0f} estimates/s over {args.n:,} batch/sequence sizes (target >= 20,000)")
    models = ["gpt2", "roberta-base", "Llama-3.2-1B", "Qwen2.5-0.5B", "Mistral-7B-v0.1", "gemma-2b"]
    methods = ["full", "lora", "adapter", "ia3", "prompt"]
    start = time.perf_counter()
    count = 0
    for m in models:
        sp, _ = resolve_spec(m)
        for meth in methods:
            for dtype in ("fp32", "bf16"):
                estimate(sp, resolve_setup(None, {"method": meth, "dtype": dtype, "batch_size": 4, "seq_len": 256}))
                count += 1
    print(f"cold path: {count / (time.perf_counter() - start):,.0f} distinct model/method/dtype estimates/s")


if __name__ == "__main__":
    main()
