"""Profile your own run: a transformers Trainer fine-tuning GPT-2 with LoRA on variable-length, padded batches
with gradient accumulation, under memprof's callback. Runs on a CPU in about a minute (random weights and random
token ids: memory and time do not depend on their values; nothing is downloaded).

    python benchmarks/profile_trainer.py [--out measurements] [--steps 8]
    memprof report measurements/trainer-gpt2-lora.rank0.jsonl --steps --plot measurements/trainer-gpt2-lora.png

The three lines that matter in your own script are marked below: import, attach, train.
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "measurements")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import peft
    import torch
    import transformers

    import memprof.integrations  # (1) import

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config()  # openai-community/gpt2's shape: 12 layers, 768 wide, 50257 tokens
    model = transformers.GPT2LMHeadModel(config)
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                                       fan_in_fan_out=True))
    rng = random.Random(0)
    lengths = [rng.choice([24, 48, 64, 96, 128]) + rng.randint(-8, 0) for _ in range(4 * 2 * args.steps)]
    data = [{"input_ids": [rng.randrange(config.vocab_size) for _ in range(n)]} for n in lengths]
    # right padding to each batch's longest with the EOS id, labels -100 on the pads
    collate = functools.partial(memprof.integrations.pad_batch, pad_token_id=config.eos_token_id)

    training = transformers.TrainingArguments(
        output_dir="/tmp/memprof-profile-trainer", per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_steps=args.steps, logging_steps=1, learning_rate=1e-4, report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, train_sampling_strategy="random")
    trainer = transformers.Trainer(model=model, args=training, train_dataset=data, data_collator=collate)
    callback = memprof.integrations.attach(trainer, out=args.out, name="trainer-gpt2-lora")  # (2) attach
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()  # (3) train as usual
    for r in callback.records:
        print(f"step {r.step}: b={r.batch_size} s<={r.seq_len} ({r.real_tokens} real tokens) peak "
              f"{r.peak_bytes / 2**20:.1f} MiB, estimate {r.estimate_peak_bytes / 2**20:.1f} MiB "
              f"({100 * r.drift_frac:+.2f}%), {r.step_time_s:.2f} s, {r.tokens_per_s:.0f} tokens/s")
    path = Path(callback.profiler.path).resolve()
    print(f"records: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")


if __name__ == "__main__":
    main()
