"""Drift check: do memprof's analytic scripts still mirror the newest transformers / peft, and which runs do the
new releases refuse?

    python benchmarks/drift.py                                   # newest transformers and peft on the index
    python benchmarks/drift.py --transformers 5.24.0 --peft 0.21.2
    python benchmarks/drift.py --python /path/to/venv/bin/python  # an environment you already have
    python benchmarks/drift.py --out estimates/drift.md          # also write the report there

It builds (or reuses) a virtual environment under ``.drift/`` with torch pinned to the tested 2.13.0 and the
chosen transformers / peft (their own dependencies resolved fresh; memprof installed from this checkout without
its version ranges, so a release beyond them can be checked too), then runs the same checks in this interpreter
(the tested versions, constraints.txt) and in that environment, and prints where they differ.

The checks: tiny configs of every family memprof models analytically (BERT, RoBERTa, GPT-2, LLaMA, Qwen2, Gemma,
Phi-3), each task, every method, three precisions (fp32 on CPU kernels, pure bf16 and fp16 AMP on emulated CUDA
kernels), traced on fake tensors (the real library code at 2 blocks) with memprof's refusal rules switched off,
so each refusal is the library's own. Per case: ok (analytic vs trace, every phase), refused (the library's
message, and whether memprof's rules for that environment predicted it), n/a (memprof's own refusal, such as
BitFit on a model without biases) or error (anything else, a traceback memprof must fix). A drift is a case
whose status, traced peak, trainable count or analytic error (beyond 1% of the trace) differs between the two
environments, or a refusal memprof's rules get wrong. Cases the analytic model misses by more than 1% under
both versions are listed apart: gaps in the model, not drift.
Takes a few minutes per environment on 2 cores (plus the first install, a few minutes more).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.01  # analytic vs trace, per phase (the validation's target for these sizes)
CUDA_ROUNDING_BYTES = 512 * 512  # the trace rounds storages to 512-byte blocks, the analytic model does not
H, I = 64, 256
CONFIGS: dict[str, dict[str, Any]] = {
    "bert": {"model_type": "bert", "vocab_size": 256, "hidden_size": H, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": I, "max_position_embeddings": 128},
    "roberta": {"model_type": "roberta", "vocab_size": 256, "hidden_size": H, "num_hidden_layers": 2,
                "num_attention_heads": 4, "intermediate_size": I, "max_position_embeddings": 130, "pad_token_id": 1,
                "type_vocab_size": 1},
    "gpt2": {"model_type": "gpt2", "vocab_size": 256, "n_embd": H, "n_layer": 2, "n_head": 4, "n_positions": 128,
             "bos_token_id": 0, "eos_token_id": 0},
    "llama": {"model_type": "llama", "vocab_size": 256, "hidden_size": H, "intermediate_size": I,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0},
    "qwen2": {"model_type": "qwen2", "vocab_size": 256, "hidden_size": H, "intermediate_size": I,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0},
    "gemma": {"model_type": "gemma", "vocab_size": 256, "hidden_size": H, "intermediate_size": I,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
              "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0},
    "phi3": {"model_type": "phi3", "vocab_size": 256, "hidden_size": H, "intermediate_size": I,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "pad_token_id": 0,
             "bos_token_id": 0, "eos_token_id": 0},
}
METHODS: dict[str, dict[str, Any]] = {
    "full": {}, "lora": {"lora": {"targets": "all-linear"}}, "qlora": {"lora": {"targets": "all-linear"}},
    "adapter": {"adapter": {"bottleneck": 16}}, "bitfit": {}, "ia3": {}, "prefix": {"prompt": {"num_virtual_tokens": 4}},
    "prompt": {"prompt": {"num_virtual_tokens": 4}},
}
PRECISIONS: dict[str, dict[str, Any]] = {
    "fp32 cpu": {"dtype": "fp32", "device": "cpu"},
    "bf16 cuda": {"dtype": "bf16", "device": "cuda"},
    "fp16-amp cuda": {"dtype": "fp16", "regime": "amp", "device": "cuda"},
}
# peft has no default IA3 targets for Phi-3's fused projections: LLaMA's choice on Phi-3's names
IA3_PHI3 = {"ia3": {"targets": "qkv_proj,down_proj", "feedforward": "down_proj"}}


# ---- the checks (run inside the environment under test) ------------------------------------------------------
def run_checks() -> dict[str, Any]:
    import warnings

    warnings.simplefilter("ignore")
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    sys.path.insert(0, str(ROOT))
    from memprof import compat
    from memprof.analytic import estimate
    from memprof.resolve import resolve_setup
    from memprof.errors import LibraryRefusalError, MemprofError
    from memprof.runtime.trace import trace_depth
    from memprof.spec import Task, from_hf_config

    versions = compat.installed_versions()
    rules = compat.KNOWN_REFUSALS
    cases = []
    start = time.perf_counter()
    for family, config in CONFIGS.items():
        tasks = [Task.seq_cls] if family in ("bert", "roberta") else [Task.causal_lm, Task.seq_cls]
        for task in tasks:
            spec = from_hf_config(config, f"tiny-{family}", task=task)
            for method, options in METHODS.items():
                if method == "ia3" and family == "phi3":
                    options = IA3_PHI3
                for precision, regime in PRECISIONS.items():
                    case = {"family": family, "task": task.value, "method": method, "precision": precision}
                    setup = resolve_setup(None, {"method": method, "batch_size": 2, "seq_len": 32, **regime,
                                                 **options})
                    rule = compat.known_refusal(spec, setup)
                    case["predicted_refusal"] = rule is not None
                    compat.KNOWN_REFUSALS = ()  # observe the library itself
                    try:
                        traced = trace_depth(spec, setup)
                        est = estimate(spec, setup, tracked=True)
                        case.update(status="ok", **_errors(est, traced, setup.device.value))
                    except LibraryRefusalError as exc:
                        case.update(status="refused", library=exc.library, message=exc.reason)
                    except MemprofError as exc:  # memprof's own refusal (BitFit without biases, ...)
                        case.update(status="n/a", message=f"{type(exc).__name__}: {exc}"[:300])
                    except Exception as exc:  # noqa: BLE001 (a drift to report, not to crash on)
                        case.update(status="error", message=f"{type(exc).__name__}: {exc}"[:300])
                    finally:
                        compat.KNOWN_REFUSALS = rules
                    cases.append(case)
    return {"versions": versions, "python": platform.python_version(), "elapsed_s": time.perf_counter() - start,
            "cases": cases}


def _errors(est: Any, traced: Any, device: str) -> dict[str, Any]:
    """Per phase: the traced peak and the analytic (tracked) estimate's relative error against it."""
    slack = CUDA_ROUNDING_BYTES if device == "cuda" else 0
    worst, traced_peak = 0.0, 0
    for phase, bd in est.phase_peaks:
        t = max((v.total_bytes for k, v in traced.steady.items() if k.split(".")[0] == phase.value), default=0)
        traced_peak = max(traced_peak, t)
        diff = bd.total_bytes - t
        rel = diff / t if t else 0.0
        if abs(diff) > slack and abs(rel) > abs(worst):
            worst = rel
    return {"traced_peak_bytes": traced_peak, "analytic_error": worst, "trainable_params": traced.trainable_params}


# ---- environments --------------------------------------------------------------------------------------------
def newest(package: str) -> str:
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", package], capture_output=True, text=True,
                         check=True).stdout
    match = re.search(rf"^{re.escape(package)} \(([^)]+)\)", out, re.M)
    if match is None:
        raise SystemExit(f"cannot read the newest {package} from `pip index versions`: {out[:200]}")
    return match.group(1)


def make_env(transformers: str, peft: str) -> Path:
    """A venv under .drift/ with torch 2.13.0 (the tested CPU wheel), the given transformers / peft, their own
    dependencies resolved fresh, and memprof from this checkout (no dependency resolution for it)."""
    env = ROOT / ".drift" / f"transformers-{transformers}_peft-{peft}"
    python = env / "bin" / "python"
    if python.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", (ROOT / "constraints.txt").read_text(), re.M))
    deps = ["torch==2.13.0", f"transformers=={transformers}", f"peft=={peft}", "accelerate",
            f"typer=={pins['typer']}", "rich", "pandas", "nvidia-ml-py"]
    print(f"installing {' '.join(deps)} into {env} ...", flush=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *deps], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)], check=True)
    return python


def run_in(python: str | Path) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([str(python), str(Path(__file__).resolve()), "--worker", out.name], check=True, cwd=ROOT)
        return json.loads(Path(out.name).read_text())


# ---- the report ----------------------------------------------------------------------------------------------
def _key(case: dict[str, Any]) -> tuple[str, ...]:
    return case["family"], case["task"], case["method"], case["precision"]


def _status(case: dict[str, Any] | None) -> str:
    if case is None:
        return "-"
    if case["status"] == "ok":
        return f"ok ({100 * case['analytic_error']:+.2f}%)"
    if case["status"] == "refused":
        return "refused (memprof rule)" if case["predicted_refusal"] else "refused (no memprof rule)"
    return case["status"]


def drifts(base: dict[str, Any], new: dict[str, Any]) -> list[tuple[dict[str, Any] | None, dict[str, Any], str]]:
    """(tested case, checked case, why) for every case that behaves differently under the checked versions, or
    whose refusal memprof's rules get wrong."""
    old = {_key(c): c for c in base["cases"]}
    out = []
    for case in new["cases"]:
        b = old.get(_key(case))
        why = []
        if b is None or b["status"] != case["status"]:
            why.append("status changed" + (f": {case['message']}" if case["status"] in ("error", "n/a") else ""))
        elif case["status"] == "ok":
            if b["traced_peak_bytes"] != case["traced_peak_bytes"]:
                why.append(f"traced peak {case['traced_peak_bytes'] - b['traced_peak_bytes']:+,d} B")
            if b["trainable_params"] != case["trainable_params"]:
                why.append(f"trainable parameters {b['trainable_params']:,} -> {case['trainable_params']:,}")
            if abs(case["analytic_error"]) > TOLERANCE and abs(b["analytic_error"]) <= TOLERANCE:
                why.append(f"analytic vs trace {100 * case['analytic_error']:+.2f}%")
        if case["status"] == "refused" and not case["predicted_refusal"]:
            why.append("refusal not in memprof's rules (compat.KNOWN_REFUSALS)")
        if case["status"] != "refused" and case["predicted_refusal"]:
            why.append("memprof's rules predict a refusal the library does not make")
        if case["status"] == "error" and b is not None and b["status"] == "error":
            why.append(f"error under both: {case['message']}")
        if why:
            out.append((b, case, "; ".join(why)))
    return out


def standing_gaps(base: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    """Cases where the analytic estimate misses the trace by more than TOLERANCE under both versions: not drift,
    a gap in memprof's model at these tiny sizes (reported so it is seen, not hidden by the comparison)."""
    old = {_key(c): c for c in base["cases"]}
    return [c for c in new["cases"] if c["status"] == "ok" and abs(c["analytic_error"]) > TOLERANCE
            and old.get(_key(c), {}).get("status") == "ok" and abs(old[_key(c)]["analytic_error"]) > TOLERANCE]


def _versions(result: dict[str, Any]) -> str:
    v = result["versions"]
    return ", ".join(f"{lib} {v[lib]}" for lib in ("torch", "transformers", "peft") if v.get(lib))


def report(base: dict[str, Any], new: dict[str, Any], command: str) -> str:
    found = drifts(base, new)
    n = len(new["cases"])
    counts = {s: sum(c["status"] == s for c in new["cases"]) for s in ("ok", "refused", "n/a", "error")}
    lines = [
        "# Drift check", "",
        f"`{command}`, {datetime.date.today().isoformat()}, {platform.platform()} (CPU, {os.cpu_count()} cores), "
        f"Python {new['python']}.", "",
        f"- tested: {_versions(base)} ({base['elapsed_s']:.0f} s)",
        f"- checked: {_versions(new)} ({new['elapsed_s']:.0f} s)", "",
        f"{n} cases (7 families x tasks x methods x 3 precisions, traced at 2 blocks with memprof's refusal rules "
        f"off): {counts['ok']} ok, {counts['refused']} refused by the libraries, {counts['n/a']} refused by memprof "
        f"(n/a: e.g. BitFit on a model without biases), {counts['error']} errors; {len(found)} drifted.", "",
    ]
    if not found:
        lines.append("No drift: every case behaves as under the tested versions.")
    else:
        lines += ["| family | task | method | precision | tested | checked | drift |", "|---|---|---|---|---|---|---|"]
        for b, case, why in found:
            lines.append(f"| {case['family']} | {case['task']} | {case['method']} | {case['precision']} | "
                         f"{_status(b)} | {_status(case)} | {why.replace('|', '/')} |")
    refused = {(c["library"], c["message"]) for c in new["cases"] if c["status"] == "refused"}
    if refused:
        lines += ["", "Refusals under the checked versions (the libraries' own messages):"]
        for library, message in sorted(refused):
            which = sorted({f"{c['family']} {c['task']} {c['method']}" for c in new["cases"]
                            if c["status"] == "refused" and c["message"] == message})
            lines.append(f"- {library}: \"{message}\" ({len(which)} runs: {', '.join(which[:8])}"
                         f"{', ...' if len(which) > 8 else ''})")
    gaps = standing_gaps(base, new)
    if gaps:
        lines += ["", f"Not drift, but seen: {len(gaps)} cases where the analytic estimate misses the trace by more "
                  f"than {100 * TOLERANCE:.0f}% under both versions (gaps in memprof's model at these tiny sizes): "
                  + ", ".join(f"{c['family']} {c['task']} {c['method']} {c['precision']} "
                              f"{100 * c['analytic_error']:+.2f}%" for c in gaps) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transformers", help="version to check [default: the newest on the index]")
    parser.add_argument("--peft", help="version to check [default: the newest on the index]")
    parser.add_argument("--python", help="check this interpreter's environment instead of building one")
    parser.add_argument("--baseline", help="interpreter of the tested environment [default: this one]")
    parser.add_argument("--out", type=Path, help="also write the markdown report to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        Path(args.worker).write_text(json.dumps(run_checks()))
        return
    python = args.python or make_env(args.transformers or newest("transformers"), args.peft or newest("peft"))
    base = run_in(args.baseline or sys.executable)
    new = run_in(python)
    command = "python benchmarks/drift.py" + "".join(f" {a}" for a in sys.argv[1:])
    text = report(base, new, command)
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
