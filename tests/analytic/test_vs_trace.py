"""The analytic estimator against the traced one (the real model and method on fake tensors).

Small configs of each family, every method, the precision regimes, both attention kernels, CPU kernels and
emulated CUDA kernels, checkpointing. Each phase's peak must agree within 1%.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from refusals import skip_if_refused  # noqa: E402
from memprof.errors import ConfigError  # noqa: E402
from memprof.resolve import resolve_setup  # noqa: E402
from memprof.analytic import estimate  # noqa: E402
from memprof.runtime.trace import trace_depth  # noqa: E402
from memprof.spec import Task, from_hf_config  # noqa: E402

H, I = 128, 512
CONFIGS = {
    "bert": {"model_type": "bert", "vocab_size": 512, "hidden_size": H, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": I, "max_position_embeddings": 128},
    "roberta": {"model_type": "roberta", "vocab_size": 512, "hidden_size": H, "num_hidden_layers": 2,
                "num_attention_heads": 4, "intermediate_size": I, "max_position_embeddings": 130, "pad_token_id": 1,
                "type_vocab_size": 1},
    "gpt2": {"model_type": "gpt2", "vocab_size": 512, "n_embd": H, "n_layer": 2, "n_head": 4, "n_positions": 128},
    "llama": {"model_type": "llama", "vocab_size": 512, "hidden_size": H, "intermediate_size": I,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "tie_word_embeddings": False},
    "qwen2": {"model_type": "qwen2", "vocab_size": 512, "hidden_size": H, "intermediate_size": I,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "gemma": {"model_type": "gemma", "vocab_size": 512, "hidden_size": H, "intermediate_size": I,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64},
    "phi3": {"model_type": "phi3", "vocab_size": 512, "hidden_size": H, "intermediate_size": I,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "pad_token_id": 0},
}
METHODS = [("full", {}), ("lora", {"lora": {"targets": "all-linear"}}), ("qlora", {}),
           ("adapter", {"adapter": {"bottleneck": 16}}),
           ("ia3", {}), ("prefix", {"prompt": {"num_virtual_tokens": 8}}), ("prompt", {"prompt": {"num_virtual_tokens": 8}})]


# The traced CUDA runs round every storage up to the caching allocator's 512-byte blocks; the analytic
# estimator does not (a few hundred live tensors at most here: up to 256 KiB). Real models make this 0.01%.
CUDA_ROUNDING_BYTES = 512 * 512


def _phase_errors(family: str, over: dict, task: Task | None = None,
                  layers: int | None = None) -> dict[str, tuple[float, int]]:
    spec = from_hf_config(CONFIGS[family], f"tiny-{family}", task=task)
    if layers is not None:
        spec = spec.with_layers(layers)
    setup = resolve_setup(None, {"batch_size": 4, "seq_len": 64, **over})
    skip_if_refused(spec, setup, lambda: trace_depth(spec, setup))
    est = estimate(spec, setup, tracked=True)  # a trace runs under dispatch modes: out-of-place accumulation
    traced = trace_depth(spec, setup)
    errors = {}
    for phase, bd in est.phase_peaks:
        t = max((v.total_bytes for k, v in traced.steady.items() if k.split(".")[0] == phase.value), default=None)
        assert t is not None, f"trace has no {phase.value} phase"
        slack = CUDA_ROUNDING_BYTES if setup.device.value == "cuda" else 0
        diff = bd.total_bytes - t
        errors[phase.value] = (diff / t, max(0, abs(diff) - slack))
    return errors


def _assert_close(errors: dict[str, tuple[float, int]], tol: float = 0.01) -> None:
    bad = {k: f"{100 * rel:+.2f}%" for k, (rel, beyond_slack) in errors.items() if abs(rel) > tol and beyond_slack}
    assert not bad, f"analytic vs traced beyond {100 * tol:.0f}%: {bad}"


@pytest.mark.parametrize("method,options", METHODS, ids=[m for m, _ in METHODS])
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_method_on_each_family(family: str, method: str, options: dict, device: str) -> None:
    _assert_close(_phase_errors(family, {"method": method, "device": device, "dtype": "fp32", **options}))


@pytest.mark.parametrize("regime", [{"dtype": "bf16"}, {"dtype": "fp16", "regime": "amp"},
                                    {"dtype": "bf16", "regime": "mixed"}], ids=["pure", "amp", "mixed"])
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_precision_regimes(family: str, method: str, regime: dict) -> None:
    _assert_close(_phase_errors(family, {"method": method, **regime}))


@pytest.mark.parametrize("family", ["roberta", "qwen2", "gemma", "phi3"])
def test_family_variants(family: str) -> None:
    _assert_close(_phase_errors(family, {"method": "lora", "dtype": "bf16",
                                         "lora": {"targets": "all-linear"}}))


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method", ["full", "lora", "prompt"])
def test_gradient_checkpointing(family: str, attn: str, method: str) -> None:
    _assert_close(_phase_errors(family, {"method": method, "attn_impl": attn, "grad_checkpointing": True,
                                         "dtype": "bf16", "prompt": {"num_virtual_tokens": 8} if method == "prompt" else None}))


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_autocast_weight_copies_at_depth(family: str) -> None:
    """Autocast caches every block's half weight copies until the forward ends; with checkpointing nothing
    else keeps them, so at depth 6 the forward-end free must release four middle blocks' copies, not one
    (the replay has one middle block). Compared per phase against a full-depth trace."""
    _assert_close(_phase_errors(family, {"method": "full", "dtype": "fp16", "regime": "amp",
                                         "grad_checkpointing": True}, layers=6))


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "gemma"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("regime", [{"dtype": "fp32"}, {"dtype": "fp16", "regime": "amp"}], ids=["fp32", "amp"])
def test_prefix_cache_at_depth(family: str, device: str, regime: dict) -> None:
    """Prefix tuning: the DynamicCache keeps every layer's key/value concatenation until the forward returns
    (fp32 under autocast, where attention saves half copies), decoders' SDPA converts the bool mask per layer,
    and the prefix storage dies with the last layer's cache update: checked at depth 5 (three middle blocks)."""
    _assert_close(_phase_errors(family, {"method": "prefix", "device": device, **regime,
                                         "prompt": {"num_virtual_tokens": 8}}, layers=5))


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_batch_of_one(family: str, attn: str, device: str) -> None:
    """At b=1 torch.matmul folds any (1, heads, s, d) layout as a view: no copies of q, k, v for the scores
    (eager, and SDPA's math kernel on CPU). The estimator keeps whether b is 1 in its structural cache key."""
    _assert_close(_phase_errors(family, {"method": "lora", "device": device, "dtype": "bf16", "attn_impl": attn,
                                         "batch_size": 1, "seq_len": 128}))


@pytest.mark.parametrize("family", ["llama", "gemma"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("regime", [{"dtype": "fp32"}, {"dtype": "fp16", "regime": "amp"}], ids=["fp32", "amp"])
@pytest.mark.parametrize("method", ["prefix", "lora"])
def test_repeat_kv(family: str, attn: str, regime: dict, method: str) -> None:
    """Eager attention, or SDPA with a mask (prefix tuning's), makes transformers repeat k/v to every head
    before the attention op (so autocast casts the repeated tensors): a copy for GQA (llama: 2 kv heads), a
    stride-0 view for MQA (gemma: 1 kv head), which a cast materialises and eager's matmul otherwise copies."""
    options = {"prompt": {"num_virtual_tokens": 8}} if method == "prefix" else {}
    _assert_close(_phase_errors(family, {"method": method, "device": "cuda", "attn_impl": attn, **regime, **options}))


@pytest.mark.parametrize("optimizer", ["sgd", "sgd-momentum", "adafactor", "lion"])
def test_optimizers(optimizer: str) -> None:
    _assert_close(_phase_errors("llama", {"optimizer": optimizer, "dtype": "fp32"}))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_with_a_classification_head(family: str) -> None:
    _assert_close(_phase_errors(family, {"method": "bitfit" if family == "gpt2" else "lora", "dtype": "bf16"},
                                task=Task.seq_cls))


@pytest.mark.parametrize("method,regime", [("lora", {"dtype": "bf16", "regime": "mixed",
                                                    "lora": {"r": 64, "targets": "all-linear"}}),
                                           ("adapter", {"dtype": "bf16", "regime": "mixed", "adapter": {"bottleneck": 64}}),
                                           ("qlora", {"dtype": "bf16"}), ("qlora", {"dtype": "fp16", "regime": "amp"})],
                         ids=["lora-mixed", "adapter-mixed", "qlora-bf16", "qlora-amp"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_categories_agree(family: str, method: str, regime: dict) -> None:
    """Per category at each phase's peak, not only the total: fp32 trainable weights in the mixed regime are
    their own masters (trainable parameters, not master weights), and QLoRA's dequantized weights are weight
    copies in both estimators (bitsandbytes' copies under AMP included)."""
    spec = from_hf_config(CONFIGS[family], f"tiny-{family}")
    # CPU kernels: no 512-byte rounding, so a tiny model's categories are exact (rank 64: adapters ~10% of the peak)
    setup = resolve_setup(None, {"batch_size": 4, "seq_len": 64, "method": method, "device": "cpu", **regime})
    est = estimate(spec, setup, tracked=True)
    traced = trace_depth(spec, setup)
    for phase, bd in est.phase_peaks:
        t = max((v for k, v in traced.steady.items() if k.split(".")[0] == phase.value), key=lambda v: v.total_bytes)
        a_cats, t_cats = bd.as_dict(), t.as_dict()
        bad = {c: (a_cats[c], t_cats[c]) for c in a_cats
               if abs(a_cats[c] - t_cats[c]) > 0.01 * t.total_bytes}
        assert not bad, f"{phase.value}: categories (analytic, traced) differ beyond 1% of the peak: {bad}"



DORA_REGIMES = [{"dtype": "fp32", "device": "cpu"}, {"dtype": "fp32"}, {"dtype": "bf16"},
                {"dtype": "fp16", "regime": "amp"}, {"dtype": "bf16", "regime": "mixed"}]


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no dropout", "dropout"])
@pytest.mark.parametrize("regime", DORA_REGIMES, ids=["fp32 cpu", "fp32", "pure", "amp", "mixed"])
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_dora(family: str, regime: dict, dropout: float, request: pytest.FixtureRequest) -> None:
    """DoRA (peft's DoraLinearLayer): the magnitude vector, the detached weight norm built from an identity
    matrix through A and B and a copy of the weight in x's dtype (freed when the layer returns), and what the
    scaled sum keeps for backward: the base result, and with LoRA dropout the weight copy the extra linear reads.
    Open gap (strict: a fix shows up here): fp16 AMP on layers with a bias (BERT, GPT-2), where
    ``base_result - bias`` promotes the half base result to fp32: BERT's backward -2.6%, GPT-2 up to -6%."""
    if regime.get("regime") == "amp" and family in ("bert", "gpt2") and (family == "gpt2" or dropout == 0.0):
        request.applymarker(pytest.mark.xfail(strict=True, reason="DoRA under fp16 AMP with biased layers (open gap)"))
    _assert_close(_phase_errors(family, {"method": "lora", **regime,
                                         "lora": {"dora": True, "dropout": dropout, "targets": "all-linear"}}))


# peft methods beyond the original eight (issue 14): each at its defaults, every regime, the three families (LoHa and
# LoKr adapt nn.Linear only: on GPT-2, whose projections are transformers Conv1D, both sides refuse)
MORE_METHODS = ["adalora", "vera", "loha", "lokr", "ln-tuning", "p-tuning", "trainable-tokens"]
MORE_REGIMES = [{"dtype": "fp32", "device": "cpu"}, {"dtype": "bf16"}, {"dtype": "fp16", "regime": "amp"},
                {"dtype": "bf16", "regime": "mixed", "grad_checkpointing": True}]


@pytest.mark.parametrize("regime", MORE_REGIMES, ids=["fp32 cpu", "pure", "amp", "mixed ckpt"])
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("method", MORE_METHODS)
def test_more_peft_methods(method: str, family: str, regime: dict) -> None:
    """AdaLoRA (SVD form, its in-place add and the orthogonal regularisation in the loss), VeRA (shared frozen
    projections, two trained scales), LoHa / LoKr (a weight-sized delta built and kept in every forward), LN
    tuning (trainable norm copies), P-tuning (the MLP prompt encoder over the batch), trainable tokens (a merged
    embedding matrix per forward, and per tied head)."""
    task = Task.seq_cls if family == "bert" else None
    if method in ("loha", "lokr") and family == "gpt2":
        spec = from_hf_config(CONFIGS[family], f"tiny-{family}")
        setup = resolve_setup(None, {"method": method, "batch_size": 4, "seq_len": 64, **regime})
        with pytest.raises(ConfigError, match="Conv1D"):
            estimate(spec, setup)
        with pytest.raises(ConfigError, match="Conv1D"):
            trace_depth(spec, setup)
        return
    _assert_close(_phase_errors(family, {"method": method, **regime}, task))


@pytest.mark.parametrize("method,options", [("adalora", {"r": 4, "targets": "all-linear", "dropout": 0.1}),
                                            ("vera", {"r": 32, "targets": "all-linear"}),
                                            ("loha", {"r": 16, "targets": "all-linear"}),
                                            ("lokr", {"r": 2, "targets": "all-linear"})])
def test_lora_like_options(method: str, options: dict) -> None:
    """The [lora] options the LoRA-like methods read: rank, targets, dropout (LoKr at r=2 factors w2)."""
    _assert_close(_phase_errors("llama", {"method": method, "dtype": "bf16", "lora": options}))


@pytest.mark.xfail(strict=True, reason="AdaLoRA on wide targets: backward under-estimated (open gap)")
def test_adalora_wide_targets_gap() -> None:
    """Open gap (strict: a fix shows up here): AdaLoRA on every linear of BERT in fp32 on CUDA, where ranknum trains
    and each target's division by it runs its backward over a (b, s, d_out) product: -5.5% in the backward at
    r=4 (the default q/v targets and LLaMA's all-linear rows above meet the target)."""
    _assert_close(_phase_errors("bert", {"method": "adalora", "dtype": "fp32", "lora": {"r": 4, "targets": "all-linear"}},
                                Task.seq_cls))
