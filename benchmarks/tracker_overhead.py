"""Tracker overhead: the time of a training step under ``MemoryTracker`` over the time of a plain step.

roberta-base (memprof preset, sequence classification) at batch 8, sequence 128, fp32 on CPU, LoRA and full
fine-tuning. Plain and tracked steps alternate after one warm-up step so drift affects both alike; the
tracked time includes registering the parameters, optimizer states and batch with a fresh tracker, as the
harness's breakdown step does.

    python benchmarks/tracker_overhead.py [--steps 3] [--methods lora,full] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="plain and tracked steps per method")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()

    import torch

    from memprof.config import Device, Dtype, Method, RunSetup, with_method_defaults
    from memprof.hub import resolve_spec
    from memprof.runtime.harness import build_run, run_timed, run_warmup, tracked_step
    from memprof.runtime.probes import env_info
    from memprof.units import fmt_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    env = env_info("cpu")
    print(f"device: {env.device_name} ({env.cpu_threads} torch threads), {env.platform}")
    print(f"versions: memprof {env.memprof_version}, python {env.python_version}, torch {env.torch_version}, "
          f"transformers {env.transformers_version}, peft {env.peft_version}; {env.date}")
    spec, _ = resolve_spec("roberta-base")
    print(f"model: {spec.name} ({spec.task.value}), batch {args.batch_size}, seq {args.seq_len}, fp32, cpu, "
          f"{args.steps} plain + {args.steps} tracked steps after 1 warm-up")
    print(f"{'method':8s} {'plain s':>9s} {'tracked s':>10s} {'ratio':>7s} {'tracker peak':>13s} {'peak phase':>11s}")
    for name in args.methods.split(","):
        setup = with_method_defaults(RunSetup(method=Method(name), batch_size=args.batch_size, seq_len=args.seq_len,
                                              dtype=Dtype.fp32, device=Device.cpu))
        run = build_run(spec, setup, "cpu")
        run_warmup(run, setup, "cpu", 1)
        plain: list[float] = []
        tracked: list[float] = []
        for _ in range(args.steps):
            plain += run_timed(run, setup, "cpu", 1)
            start = time.perf_counter()
            result = tracked_step(run, setup, "cpu")
            tracked.append(time.perf_counter() - start)
        p, t = statistics.median(plain), statistics.median(tracked)
        print(f"{name:8s} {p:9.2f} {t:10.2f} {t / p:7.2f} {fmt_bytes(result.peak_bytes):>13s} {result.peak_phase:>11s}")
        del run


if __name__ == "__main__":
    main()
