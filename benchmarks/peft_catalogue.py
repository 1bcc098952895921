"""Every method the installed peft registers, traced with its defaults on a tiny LLaMA-style model and a tiny BERT,
against a real CPU step of the same model and config (the tracker's peak) and peft's own trainable count.

    python benchmarks/peft_catalogue.py                  # prints the markdown table
    python benchmarks/peft_catalogue.py --out estimates/peft_catalogue.md

Width 256 (so every method's default sizes fit: C3A's 256 blocks, VBLoRA's 256-long vectors), 4 blocks (the trace
runs 2 and 3 and extrapolates), b=2, s=16, fp32 on CPU kernels. A few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

import torch  # noqa: E402

from memprof.compat import installed_versions  # noqa: E402
from memprof.config import Device, Dtype, Method, RunSetup  # noqa: E402
from memprof.runtime.catalogue import default_config, peft_types, trace_method  # noqa: E402
from memprof.runtime.harness import run_measurement  # noqa: E402
from tiny_configs import tiny_spec  # noqa: E402

MODELS = {"llama": {"num_key_value_heads": 4}, "bert": {"num_attention_heads": 4}}


def cpu_step(spec, setup, peft_type):  # noqa: ANN001, ANN201
    try:
        m = run_measurement(spec, setup, peft_config=default_config(peft_type, spec), warmup_steps=1, timed_steps=1)
        return m.peak_bytes, m.trainable_params, None
    except Exception as exc:  # noqa: BLE001 (a failing real step is a result here)
        return None, None, f"{type(exc).__name__}: {' '.join(str(exc).split())[:90]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    setup = RunSetup(method=Method.lora, batch_size=2, seq_len=16, dtype=Dtype.fp32, device=Device.cpu)
    v = installed_versions()
    lines = [f"# peft's method catalogue, traced ({datetime.date.today()})", "",
             f"`python benchmarks/peft_catalogue.py --out estimates/peft_catalogue.md` on {platform.machine()} CPU "
             f"(no GPU), torch {v.get('torch')}, transformers {v.get('transformers')}, peft {v.get('peft')}. Each "
             "method with its defaults (plus memprof.runtime.catalogue.REQUIRED_OPTIONS; queries and values as "
             "targets where a config names none) on a tiny model of width 256 and 4 blocks, b=2, s=16, fp32: the "
             "trace (blocks 2 and 3, extrapolated) against a real CPU step (the tracker's peak, same model and "
             "config) and peft's own `get_nb_trainable_parameters()`.", "",
             "| model | method | trace peak (B) | CPU step peak (B) | trace vs CPU | trainable (trace) | trainable (peft) "
             "| outcome |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for family, overrides in MODELS.items():
        spec = tiny_spec(family, num_hidden_layers=4, hidden_size=256, intermediate_size=512, **overrides)
        for peft_type in peft_types():
            start = time.perf_counter()
            try:
                row = trace_method(spec, setup, peft_type)
                traced, why = row.peak_bytes, row.message
            except Exception as exc:  # noqa: BLE001
                tb = traceback.extract_tb(exc.__traceback__)[-1]
                row, traced = None, None
                why = f"trace fails: {type(exc).__name__} ({tb.name}): {' '.join(str(exc).split())[:80]}"
            real, real_trainable, real_error = cpu_step(spec, setup, peft_type) if traced or row is None else (None, None, None)
            ratio = f"{traced / real - 1:+.4%}" if traced and real else ""
            if traced:
                outcome = "traced" + (f"; {'; '.join(n for n in row.notes[1:])}" if len(row.notes) > 1 else "")
            else:
                outcome = why or ""
            if real_error:
                outcome += f"; real CPU step fails too: {real_error}" if not traced else f"; CPU step: {real_error}"
            lines.append(f"| tiny-{family} | {peft_type} | {traced or ''} | {real or ''} | {ratio} | "
                         f"{row.trainable_params if row and row.trainable_params is not None else ''} | "
                         f"{row.peft_trainable_params if row and row.peft_trainable_params is not None else ''} | "
                         f"{outcome.replace('|', '/')} |")
            print(lines[-1], f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
