"""Training FLOPs per step: derivation-commented goldens (hand arithmetic above each value) and PaLM's formula."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tiny_configs import tiny_spec
from memprof.config import AdapterSpec, Dtype, Method, PromptLearningSpec, RunSetup, with_method_defaults
from memprof.analytic.flops import match_gpu, mfu, palm_flops_per_token, peak_flops, step_flops


def setup_for(method: Method, **kw: object) -> RunSetup:
    return with_method_defaults(RunSetup(method=method, batch_size=2, seq_len=16, dtype=Dtype.fp32, **kw))


# tiny LLaMA: h=32, I=64, L=2, a=4 heads of d=8 (q_dim 32), 2 kv heads (kv_dim 16), V=100, untied head.
# b=2, s=16 -> T = 32 tokens.
# matmul weights per layer: q 32*32 + k 32*16 + v 32*16 + o 32*32 + gate/up/down 3*32*64 = 9216
# N = 2 layers * 9216 + LM head 32*100 = 21632
# attention per layer: 2*2*b*s*s*q_dim = 4*2*16*16*32 = 65536; two layers: 131072
LLAMA_N = 21632
LLAMA_ATTN = 131072


def test_llama_full_is_6n_plus_attention() -> None:
    f = step_flops(tiny_spec("llama"), setup_for(Method.full))
    # forward: 2*T*N + attn = 2*32*21632 + 131072 = 1515520
    assert f.forward_flops == 1_515_520
    # backward input grads: every matmul (2*T*N) + attention twice its forward: 1384448 + 262144
    assert f.backward_input_flops == 1_646_592
    # backward weight grads: every weight, 2*T*N (attention has no weights)
    assert f.backward_weight_flops == 1_384_448
    # total: 6*T*N + 3*attn = 6*32*21632 + 3*131072 = 4153344 + 393216
    assert f.total_flops == 6 * 32 * LLAMA_N + 3 * LLAMA_ATTN == 4_546_560
    # PaLM App. B: (6N + 12*L*H*Q*T_seq) per token = (129792 + 12*2*4*8*16) * 32
    assert palm_flops_per_token(tiny_spec("llama"), 16, LLAMA_N) * 32 == f.total_flops
    assert f.recompute_flops == 0


def test_llama_lora_skips_frozen_weight_grads_and_low_input_grads() -> None:
    f = step_flops(tiny_spec("llama"), setup_for(Method.lora))
    # LoRA r=8 on q_proj (A 32x8, B 8x32) and v_proj (A 32x8, B 8x16): 256+256+256+128 = 896 per layer, 1792
    # forward: 2*32*(21632 + 1792) + 131072 = 1499136 + 131072
    assert f.forward_flops == 1_630_208
    # weight grads: LoRA weights only, 2*32*1792
    assert f.backward_weight_flops == 114_688
    # input grads. Layer 0: q/k/v and the LoRA A matmuls read the frozen embeddings (no dx); the LoRA B
    # matmuls do (2*32*(256+128) = 24576); attention 2*65536 = 131072; o, gate, up, down 2*32*7168 = 458752.
    # Layer 1: every matmul 2*32*(9216+896) = 647168 + attention 131072. LM head 2*32*3200 = 204800.
    assert f.backward_input_flops == 24_576 + 131_072 + 458_752 + 647_168 + 131_072 + 204_800
    # so LoRA costs about 4N per token, not 6N
    assert f.total_flops / step_flops(tiny_spec("llama"), setup_for(Method.full)).total_flops == pytest.approx(0.735, abs=1e-3)


# tiny BERT: h=32, I=64, L=2, a=2, V=100, 2 labels; b=2, s=16 -> T=32
# per layer: q, k, v, o 4*32*32 + intermediate 32*64 + output 64*32 = 8192; N_tokens = 2*8192 = 16384
# pooler 32*32 + classifier 32*2 = 1088 run on the CLS token only (b = 2 tokens)
# attention: 4*2*16*16*32 = 65536 per layer, 131072 for two
def test_bert_full_counts_pooler_on_cls_token_only() -> None:
    f = step_flops(tiny_spec("bert"), setup_for(Method.full))
    # forward: 2*32*16384 + 2*2*1088 + 131072 = 1048576 + 4352 + 131072
    assert f.forward_flops == 1_184_000
    # 3x the matmuls + 3x attention: 3*(1048576 + 4352) + 3*131072
    assert f.total_flops == 3_552_000


def test_bitfit_and_ia3_have_no_frozen_weight_grads() -> None:
    spec = tiny_spec("bert")
    bitfit = step_flops(spec, setup_for(Method.bitfit))
    # BitFit trains biases and the classifier: weight grads only for the classifier, 2*2*(32*2)
    assert bitfit.backward_weight_flops == 256
    # the embedding LayerNorm bias trains, so every matmul above it needs input grads (as in full)
    assert bitfit.backward_input_flops == step_flops(spec, setup_for(Method.full)).backward_input_flops


def test_adapter_adds_its_matmuls() -> None:
    spec = tiny_spec("gpt2")
    full = step_flops(spec, setup_for(Method.full))
    ad = step_flops(spec, setup_for(Method.adapter, adapter=AdapterSpec(bottleneck=8)))
    # Houlsby: 2 adapters per layer, down 32x8 + up 8x32 = 512 weights each, 2 layers -> 2048
    # forward grows by 2*T*2048 = 2*32*2048 = 131072
    assert ad.forward_flops - full.forward_flops == 131_072
    # weight grads: adapters only (GPT-2 causal LM has no classifier): 2*32*2048
    assert ad.backward_weight_flops == 131_072


def test_prompt_tuning_lengthens_the_sequence_and_prefix_the_keys() -> None:
    spec = tiny_spec("llama")
    base = step_flops(spec, setup_for(Method.full))
    prompt = step_flops(spec, setup_for(Method.prompt, prompt=PromptLearningSpec(num_virtual_tokens=4)))
    # s -> 20: T = 40 tokens; attention 4*2*20*20*32*2 layers = 204800
    assert prompt.forward_flops == 2 * 40 * LLAMA_N + 204_800
    prefix = step_flops(spec, setup_for(Method.prefix, prompt=PromptLearningSpec(num_virtual_tokens=4)))
    # keys grow to 20: attention 4*2*16*20*32*2 = 163840; token matmuls unchanged
    assert prefix.forward_flops == base.forward_flops - LLAMA_ATTN + 163_840


def test_checkpointing_recomputes_the_blocks_outside_model_flops() -> None:
    spec = tiny_spec("llama")
    plain = step_flops(spec, setup_for(Method.full))
    ckpt = step_flops(spec, setup_for(Method.full, grad_checkpointing=True))
    assert ckpt.total_flops == plain.total_flops
    # one more forward of the blocks: 2*32*18432 + 131072
    assert ckpt.recompute_flops == 1_310_720
    assert ckpt.hardware_flops == plain.total_flops + 1_310_720


def test_mfu_and_peak_lookup() -> None:
    # 1e15 FLOPs in 2 s on a 1e15 FLOP/s device: 50%
    assert mfu(1e15, 2.0, 1e15) == 0.5
    with pytest.raises(ValueError):
        mfu(1.0, 0.0, 1e15)
    assert match_gpu("NVIDIA H100 80GB HBM3")["name"] == "H100-80GB"
    assert match_gpu("NVIDIA A100-SXM4-40GB")["name"] == "A100-40GB"
    assert match_gpu("NVIDIA A100-PCIE-40GB")["name"] == "A100-40GB"
    assert match_gpu("NVIDIA A100-SXM4-80GB")["name"] == "A100-80GB"
    assert match_gpu("Tesla V100-SXM2-32GB")["name"] == "V100-32GB"
    assert match_gpu("NVIDIA GeForce RTX 4090")["name"] == "RTX-4090"
    assert match_gpu("NVIDIA L4")["name"] == "L4"       # not L40S
    assert match_gpu("NVIDIA L40S")["name"] == "L40S"
    assert match_gpu("NVIDIA A10G")["name"] == "A10"    # not A100
    assert match_gpu("Some Unknown GPU") is None
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp32") == 67e12
    assert peak_flops("Tesla T4", "bf16") is None          # T4 has no bf16 tensor cores
    assert peak_flops("Intel Xeon", "fp32") is None


def test_flops_module_is_pure() -> None:
    code = "import sys, memprof.analytic.flops; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
