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
