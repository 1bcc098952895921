"""Per-rank memory beyond one GPU (issue 12): Llama-3.1-8B and Llama-3.1-70B, full fine-tuning, LoRA and QLoRA,
under FSDP2 and DeepSpeed ZeRO-3 on 1 to 64 GPUs. Analytic estimates only: no device, nothing traced or measured.

    python benchmarks/parallel_tables.py               # -> estimates/parallel_8b_70b.{csv,md}
    python benchmarks/parallel_tables.py --out DIR     # elsewhere

Every run: bf16, b=1, s=2048, AdamW, sdpa, no gradient checkpointing, the rest memprof's defaults (pure bf16:
bf16 weights and AdamW states; ZeRO ranks run DeepSpeed's mixed precision, fp32 masters and states, as the table's
regime column says); full fine-tuning also in the mixed regime (FSDP2's MixedPrecisionPolicy over fp32 shards), the
like-for-like comparison with ZeRO-3. World size 1 is the plain one-device run. The rows are ``memprof.scaling.rank_rows``, the
table of ``memprof compare MODEL --methods full,lora,qlora --strategies fsdp,zero3 --world-sizes 1,2,...,64 -s 2048
--gpu H100``; the markdown under each model is that command's ``-f markdown`` output. A combination the estimator
refuses is a row with status n/a and its one-line reason.
"""

from __future__ import annotations

import argparse
import datetime
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402

from memprof import __version__  # noqa: E402
from memprof.analytic.fit import resolve_gpu  # noqa: E402
from memprof.compat import installed_versions  # noqa: E402
from memprof.hub import resolve_spec  # noqa: E402
from memprof.report import Format, rows_csv  # noqa: E402
from memprof.run_documents import render_rank_rows  # noqa: E402
from memprof.scaling import plan_worlds, rank_rows, smallest_fitting  # noqa: E402
from memprof.sweep import plan_setups  # noqa: E402

MODELS = ("Llama-3.1-8B", "Llama-3.1-70B")
METHODS = ("full", "lora", "qlora")
STRATEGIES = "fsdp,zero3"
WORLD_SIZES = "1,2,4,8,16,32,64"
RUN = {"dtype": "bf16", "batch_size": 1, "seq_len": 2048}
GPU = "H100"  # an 80 GB GPU of the catalog (81,559 MiB = 79.65 GiB)
STEM = "parallel_8b_70b"


def command(model: str, methods: tuple[str, ...] = METHODS, regime: str | None = None) -> str:
    return (f"memprof compare {model} --methods {','.join(methods)} --strategies {STRATEGIES} --world-sizes "
            f"{WORLD_SIZES} --dtype bf16" + (f" --regime {regime}" if regime else "")
            + f" -b 1 -s 2048 --gpu {GPU} -f markdown")


# (methods, regime): the default (pure bf16), and full fine-tuning in the mixed regime (FSDP2's MixedPrecisionPolicy
# over fp32 shards; ZeRO's rows are DeepSpeed's mixed precision either way): the like-for-like comparison of the
# two engines
RUNS = ((METHODS, None), (("full",), "mixed"))


def tables() -> tuple[list[dict], list[str], list[str]]:
    """The CSV rows of every model, the markdown section of each, and which world sizes fit (one line a model)."""
    gpu = resolve_gpu(GPU)
    plan = plan_worlds(WORLD_SIZES, STRATEGIES, {})
    rows, sections, answers = [], [], []
    for model in MODELS:
        spec, _ = resolve_spec(model)
        for methods, regime in RUNS:
            ranked = rank_rows(spec, plan_setups(methods, {**RUN, **({"regime": regime} if regime else {})}),
                               plan, gpu)
            rows += [r.to_row() for r in ranked]
            label = f"{model}" + (f", {regime} regime" if regime else "")
            answers += [f"- {label}: {line.split(': ', 1)[1]}" for line in smallest_fitting(ranked)]
            out = io.StringIO()
            render_rank_rows(ranked, Format.markdown, Console(file=out, width=200, soft_wrap=True))
            title = f"## {model}" + (f" (full fine-tuning, {regime} regime)" if regime else "")
            sections.append(f"{title}\n\n`{command(model, methods, regime)}`\n\n{out.getvalue()}")
    return rows, sections, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "estimates", help="folder of the .csv and .md")
    args = parser.parse_args()
    rows, sections, answers = tables()
    versions = installed_versions()
    fitting = [r for r in rows if r["fits"]]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    head = [
        "# Per-rank memory beyond one GPU: Llama-3.1-8B and Llama-3.1-70B (issue 12)",
        "",
        "Command: `python benchmarks/parallel_tables.py` (the rows in parallel_8b_70b.csv; each table below is the "
        "markdown output of the command above it).",
        f"Date: {date}. Versions: memprof {__version__}, torch {versions.get('torch') or '-'}, transformers "
        f"{versions.get('transformers') or '-'}, peft {versions.get('peft') or '-'}. Device: analytic (no device); "
        "the estimates model a CUDA GPU per rank.",
        "",
        "Every run: bf16, b=1, s=2048, AdamW, sdpa, no gradient checkpointing. In the first table of each model the "
        "one-device and FSDP rows are pure bf16 (bf16 weights, gradients and AdamW states); the ZeRO-3 rows are always "
        "DeepSpeed's mixed precision (fp32 master weights and AdamW states, regime column). The second table is full "
        "fine-tuning in the mixed regime: one device with half weights and fp32 masters, FSDP2 with a "
        "MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) over fp32 shards: the like-for-like comparison of "
        "FSDP and ZeRO-3. World size 1 (GPUs 1) is the plain one-device run. Without gradient checkpointing the "
        "activations of 70B at s=2048 take 59 GiB a rank, which no sharding removes.",
        "",
        f"Which rows fit an 80 GB GPU (H100-80GB, 79.65 GiB; column fits: device total per rank <= it): "
        f"{len(fitting)} of {len(rows)}. The smallest world size listed that fits, per method and strategy (every "
        "larger one listed fits too unless the table says otherwise):",
        "",
        *answers,
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{STEM}.csv").write_text(rows_csv(rows))
    (args.out / f"{STEM}.md").write_text("\n".join(head) + "\n" + "\n".join(sections))
    print(f"wrote {args.out / STEM}.csv and .md: {len(rows)} rows, {len(fitting)} fit {GPU}")


if __name__ == "__main__":
    main()
