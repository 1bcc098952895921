"""Tiny configs of each analytic family (fast on 2 CPU cores), shared by the tests."""

from __future__ import annotations

from memprof.spec import ModelSpec, from_hf_config

# encoder: hidden 32, 2 layers, 2 heads, intermediate 64, vocab 100, 64 positions
BERT = {"model_type": "bert", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}
GPT2 = {"model_type": "gpt2", "vocab_size": 100, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64,
        "bos_token_id": 0, "eos_token_id": 0}
# LLaMA-like with grouped-query attention: 4 query heads share 2 key/value heads; untied LM head
LLAMA = {"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0}
CONFIGS = {"bert": BERT, "gpt2": GPT2, "llama": LLAMA}


def tiny_spec(family: str, **overrides: object) -> ModelSpec:
    return from_hf_config({**CONFIGS[family], **overrides}, f"tiny-{family}", source="file")

# traced-only architectures (tests/runtime/test_trace_failures.py): built from these configs, never downloaded
T5 = {"model_type": "t5", "vocab_size": 100, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2,
      "num_decoder_layers": 2, "num_heads": 4, "eos_token_id": 1, "pad_token_id": 0, "decoder_start_token_id": 0}
DEBERTA_V2 = {"model_type": "deberta-v2", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64,
              "relative_attention": True, "position_buckets": 16, "pos_att_type": ["p2c", "c2p"],
              "position_biased_input": False}
# MoE: 4 experts, 2 per token; widths multiples of 4 so the CPU grouped_mm's 16-byte stride rule holds in fp32
MIXTRAL = {"model_type": "mixtral", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
           "num_experts_per_tok": 2, "max_position_embeddings": 64}
QWEN2_MOE = {"model_type": "qwen2_moe", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
             "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
             "max_position_embeddings": 64}
OLMOE = {"model_type": "olmoe", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 4,
         "num_experts_per_tok": 2, "max_position_embeddings": 64}
MODERNBERT = {"model_type": "modernbert", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 64,
              "global_attn_every_n_layers": 1, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
              "cls_token_id": 1, "sep_token_id": 2}
# image classification (--task image-cls): a ViT on 32x32 images in 8x8 patches (16 patches + [CLS] = 17 tokens)
VIT = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
       "intermediate_size": 64, "image_size": 32, "patch_size": 8, "num_channels": 3, "qkv_bias": True,
       "num_labels": 10}
# encoder-decoder (seq2seq) beside T5; Gemma-2 (no SDPA: transformers falls back to eager) and Gemma-3 (sliding and
# full blocks), each at a width the trace walks in a second (tests/runtime/test_architecture_walk.py)
BART = {"model_type": "bart", "vocab_size": 100, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
        "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
        "max_position_embeddings": 64, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
        "decoder_start_token_id": 2}
GEMMA2 = {"model_type": "gemma2", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
          "sliding_window": 8, "max_position_embeddings": 64}
GEMMA3 = {"model_type": "gemma3_text", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8,
          "sliding_window": 8, "sliding_window_pattern": 2, "max_position_embeddings": 64}
