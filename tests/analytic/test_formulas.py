"""Formula terms against hand arithmetic (the derivation is written above each expected value)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from memprof.resolve import resolve_setup
from memprof.analytic import estimate
from memprof.analytic.compose import replay
from memprof.analytic.explain import explain_terms
from memprof.analytic.params import method_params
from memprof.analytic.sim import peval
from memprof.analytic.states import quantized_bytes, state_bytes
from memprof.hub import resolve_spec
from memprof.records import Category
from memprof.spec import from_hf_config

GPT2_PARAMS = 124_439_808  # wte 50257*768 + wpe 1024*768 + 12 blocks * 7,087,872 + ln_f 1,536


def _states(model: str, **options):  # noqa: ANN003, ANN202
    spec, _ = resolve_spec(model)
    return state_bytes(spec, resolve_setup(None, options))


def test_fp32_full_adamw_is_16_bytes_per_param() -> None:
    sb = _states("gpt2", dtype="fp32")
    # 4 B weights + 4 B grads + 8 B AdamW (two fp32 moments) per parameter
    assert (sb.params_trainable, sb.gradients, sb.optimizer_states) == (4 * GPT2_PARAMS, 4 * GPT2_PARAMS,
                                                                        8 * GPT2_PARAMS)
    assert sb.params_frozen == 0 and sb.master_weights == 0


def test_pure_bf16_is_8_bytes_per_param() -> None:
    sb = _states("gpt2", dtype="bf16")
    # model.to(bf16) + torch AdamW: weights, grads and both moments in bf16: 2 + 2 + 4
    assert (sb.params_trainable, sb.gradients, sb.optimizer_states) == (2 * GPT2_PARAMS, 2 * GPT2_PARAMS,
                                                                        4 * GPT2_PARAMS)


def test_amp_keeps_fp32_states_and_mixed_is_16_bytes() -> None:
    amp = _states("gpt2", dtype="fp16")  # fp16 defaults to AMP
    assert (amp.params_trainable, amp.gradients, amp.optimizer_states) == (4 * GPT2_PARAMS, 4 * GPT2_PARAMS,
                                                                           8 * GPT2_PARAMS)
    mixed = _states("gpt2", dtype="bf16", regime="mixed")
    # ZeRO (Rajbhandari et al. 2020): 2 B half weights + 4 B fp32 master + 2 B half grads + 8 B fp32 Adam = 16 B
    total = mixed.params_trainable + mixed.master_weights + mixed.gradients + mixed.optimizer_states
    assert total == 16 * GPT2_PARAMS
    assert mixed.grad_upcast == 4 * GPT2_PARAMS and mixed.grads_freed_at_step == 2 * GPT2_PARAMS


def test_optimizer_state_sizes() -> None:
    p = GPT2_PARAMS
    assert _states("gpt2", dtype="fp32", optimizer="sgd").optimizer_states == 0
    assert _states("gpt2", dtype="fp32", optimizer="sgd-momentum").optimizer_states == 4 * p
    assert _states("gpt2", dtype="fp32", optimizer="lion").optimizer_states == 4 * p
    # Adafactor factors every matrix: rows + cols values; vectors keep a full second moment.
    # gpt2: wte 50257+768, wpe 1024+768, per block c_attn 768+2304, c_proj 768+768, c_fc 768+3072,
    # mlp.c_proj 3072+768 (= 11,136) and 1-D tensors 2 LN (2*768*2) + biases 2304+768+3072+768 = 9,984;
    # ln_f 1,536
    per_block = (768 + 2304) + (768 + 768) + (768 + 3072) + (3072 + 768) + 4 * 768 + (2304 + 768 + 3072 + 768)
    elements = (50257 + 768) + (1024 + 768) + 12 * per_block + 2 * 768
    assert _states("gpt2", dtype="fp32", optimizer="adafactor").optimizer_states == 4 * elements


def test_adamw_8bit_states() -> None:
    spec, _ = resolve_spec("gpt2")
    sb = state_bytes(spec, resolve_setup(None, {"dtype": "fp32", "optimizer": "adamw-8bit"}))
    # bitsandbytes: tensors >= 4096 values get 2 x 1 B + an fp32 absmax per 256 per state; smaller keep 2 x 4 B
    from memprof.analytic.params import trainable_tensors

    expected = 0
    for r, c, _ in trainable_tensors(spec, resolve_setup(None, {"dtype": "fp32"})):
        n = r * c
        expected += 8 * n if n < 4096 else 2 * n + 8 * math.ceil(n / 256)
    assert sb.optimizer_states == expected
    assert sb.optimizer_states < 2.1 * GPT2_PARAMS


def test_lora_adapters_stay_fp32_on_a_bf16_base() -> None:
    spec, _ = resolve_spec("Llama-3.2-1B")
    setup = resolve_setup(None, {"method": "lora", "dtype": "bf16"})
    sb, pc = state_bytes(spec, setup), method_params(spec, setup)
    # 16 layers * (q 8*(2048+2048) + v 8*(2048+512)) = 851,968 fp32 LoRA params; 1,235,814,400 frozen bf16
    assert pc.trainable == 851_968 and pc.frozen == 1_235_814_400
    assert sb.params_trainable == 4 * 851_968 and sb.gradients == 4 * 851_968
    assert sb.optimizer_states == 8 * 851_968
    assert sb.params_frozen == 2 * 1_235_814_400


def test_qlora_nf4_bytes() -> None:
    # n = 1,048,576 weights, blocks of 64: 16,384 blocks; double quantization stores one byte per block plus
    # one fp32 constant per 256 blocks (64): 524,288 + 16,384 + 64 * 4 = 540,928 bytes (4.13 bits per weight)
    setup = resolve_setup(None, {"method": "qlora"})
    assert quantized_bytes(1 << 20, setup) == 524_288 + 16_384 + 256
    plain = resolve_setup(None, {"method": "qlora", "quant": {"double_quant": False}})
    # without double quantization: one fp32 absmax per block: 524,288 + 16,384 * 4
    assert quantized_bytes(1 << 20, plain) == 524_288 + 65_536


def test_qlora_frozen_base_is_about_a_quarter_of_bf16() -> None:
    spec, _ = resolve_spec("Llama-3.1-8B")
    lora = state_bytes(spec, resolve_setup(None, {"method": "lora"}))
    qlora = state_bytes(spec, resolve_setup(None, {"method": "qlora"}))
    pc = method_params(spec, resolve_setup(None, {"method": "qlora"}))
    # the block linears (6.98B of 8.03B) go to 4 bit; embeddings, lm_head and norms stay bf16
    assert pc.quantized == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    assert qlora.params_frozen == quantized_bytes(pc.quantized, resolve_setup(None, {"method": "qlora"})) + \
        2 * (pc.frozen - pc.quantized)
    assert 0.3 < qlora.params_frozen / lora.params_frozen < 0.36


def _layer_saved(spec, setup, segment: str = "layer1") -> float:  # noqa: ANN001
    """Bytes a block allocates and are alive at the end of the forward (by default the replay's middle,
    repeated block), at setup's b and s."""
    rep = replay(spec, dataclasses.replace(setup, batch_size=1, seq_len=1))
    return sum(peval(nb, setup.batch_size, setup.seq_len) for seg, _, _, nb in rep.saved_terms if seg == segment)


BERT = {"model_type": "bert", "vocab_size": 1000, "hidden_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 4, "intermediate_size": 1024, "max_position_embeddings": 512}


def test_bert_layer_reproduces_korthikanti_eq1() -> None:
    # Korthikanti et al. 2022 (arXiv:2205.05198) Eq. 1, 16-bit activations, 1-byte dropout masks:
    # per layer s*b*h*(34 + 5*a*s/h). memprof adds the two LayerNorms' fp32 mean and rstd the paper omits:
    # 2 LN * 2 stats * 4 B * s*b = 16*s*b.
    spec = from_hf_config(BERT, "tiny-bert")
    b, s, h, a = 4, 128, 256, 4
    setup = resolve_setup(None, {"dtype": "bf16", "attn_impl": "eager", "batch_size": b, "seq_len": s})
    assert _layer_saved(spec, setup) == s * b * h * 34 + 5 * a * s * s * b + 16 * s * b


def test_bert_layer_flash_attention_drops_the_s_squared_term() -> None:
    # with SDPA's flash/mem-efficient kernels (CUDA) the 5as^2b term is replaced by a (b, a, s) fp32 log-sum-exp;
    # the attention keeps q, k, v and its output instead of the two bmm copies and the context copy: still 34sbh
    spec = from_hf_config(BERT, "tiny-bert")
    b, s, h, a = 4, 128, 256, 4
    setup = resolve_setup(None, {"dtype": "bf16", "attn_impl": "sdpa", "batch_size": b, "seq_len": s})
    assert _layer_saved(spec, setup) == s * b * h * 34 + 4 * a * s * b + 16 * s * b


def test_bert_layer_on_cpu_keeps_dtype_sized_dropout_masks() -> None:
    # the CPU dropout kernel keeps its mask in the input dtype (2 B instead of 1 B): +2 sbh + a*s^2*b,
    # and CPU LayerNorm keeps mean/rstd in the input dtype (bf16): 8*s*b instead of 16*s*b
    spec = from_hf_config(BERT, "tiny-bert")
    b, s, h, a = 4, 128, 256, 4
    setup = resolve_setup(None, {"dtype": "bf16", "attn_impl": "eager", "batch_size": b, "seq_len": s,
                                 "device": "cpu"})
    assert _layer_saved(spec, setup) == s * b * h * 36 + 6 * a * s * s * b + 8 * s * b


LLAMA = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
         "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2}


def test_llama_layer_saved_bytes_bf16_sdpa() -> None:
    # one middle LlamaDecoderLayer, bf16 weights, SDPA (flash), per token, h=256, kv dim 64, I=512, a=8:
    #   2 RMSNorms: fp32 input (4h) + rsqrt (4) + normalised bf16 (2h) + output (2h) -> 8h + 4 each
    #   (the first norm's fp32 copy is the layer input upcast; the output is what q/k/v or gate/up read)
    #   attention: q after RoPE 2h, k after RoPE 2*64, v 2*64, SDPA output 2h, logsumexp 4a
    #   MLP: gate out 2I (SiLU input), SiLU out 2I, up out 2I, product 2I (down_proj input)
    spec = from_hf_config(LLAMA, "tiny-llama")
    h, kv, inter, a = 256, 64, 512, 8
    per_token = 2 * (8 * h + 4) + (2 * h + 2 * kv + 2 * kv + 2 * h + 4 * a) + 4 * 2 * inter
    setup = resolve_setup(None, {"dtype": "bf16", "batch_size": 2, "seq_len": 64})
    assert _layer_saved(spec, setup) == 2 * 64 * per_token


def test_grad_checkpointing_keeps_one_input_per_layer() -> None:
    # torch.utils.checkpoint (non-reentrant): a block keeps only its input; what block 0 leaves alive is its
    # output, the input block 1 keeps (b*s*h bf16). The last block's output is freed once the final norm ran.
    spec = from_hf_config(LLAMA, "tiny-llama")
    b, s, h = 2, 64, 256
    setup = resolve_setup(None, {"dtype": "bf16", "batch_size": b, "seq_len": s, "grad_checkpointing": True})
    assert _layer_saved(spec, setup, "layer0") == 2 * b * s * h
    assert _layer_saved(spec, setup, "layer1") == 2 * b * s * h
    assert _layer_saved(spec, setup, "layer2") == 0


def test_terms_sum_to_the_estimate() -> None:
    spec, _ = resolve_spec("Llama-3.2-1B")
    setup = resolve_setup(None, {"method": "lora", "batch_size": 4, "seq_len": 512})
    est = estimate(spec, setup, explain=True)
    acts = sum(t.bytes for t in est.terms if t.category is Category.activations)
    # the named activation terms are what is alive at the end of the forward
    fwd_end = est.phase_peaks[0][1]
    assert acts <= fwd_end.activations + fwd_end.temporaries + 1
    assert acts == pytest.approx(fwd_end.activations, rel=0.001)
    states = {t.category: t.bytes for t in est.terms if t.category in (Category.params_frozen, Category.gradients)}
    assert states[Category.params_frozen] == est.peak.params_frozen
    assert explain_terms(spec, est.setup, method_params(spec, est.setup), state_bytes(spec, est.setup), 0, 0,
                         est.peak_phase)


def test_device_totals_add_workspace_reserve_and_context() -> None:
    spec, _ = resolve_spec("gpt2")
    setup = resolve_setup(None, {"overheads": {"cuda_context_bytes": 300 * 2**20, "allocator_reserve_frac": 0.1}})
    est = estimate(spec, setup)
    allocated = est.peak_bytes + 8 * 2**20
    assert est.device.allocated_bytes == allocated
    assert est.device.reserved_bytes == allocated + round(0.1 * allocated)
    assert est.device.device_total_bytes == est.device.reserved_bytes + 300 * 2**20
    cpu = estimate(spec, resolve_setup(None, {"device": "cpu"}))
    assert cpu.device.device_total_bytes == cpu.peak_bytes


def test_foreach_adamw_temporary_is_the_whole_group() -> None:
    # CUDA (foreach): _foreach_sqrt(exp_avg_sq) allocates one tensor per parameter at once: the whole group.
    # CPU (for-loop): per tensor sqrt() and / bias_correction, while the previous tensor's denom is still
    # bound: worst is wte (50257 x 768) after nothing: 2 x wte (wpe before it is smaller than wte).
    spec, _ = resolve_spec("gpt2")
    cuda = state_bytes(spec, resolve_setup(None, {"dtype": "fp32"}))
    cpu = state_bytes(spec, resolve_setup(None, {"dtype": "fp32", "device": "cpu"}))
    assert cuda.optimizer_temp == 4 * GPT2_PARAMS
    assert cpu.optimizer_temp == 2 * 4 * 50257 * 768
