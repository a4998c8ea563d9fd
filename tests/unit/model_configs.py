"""config.json of well-known models (the fields the planner reads), shared by the planner's tests."""

from __future__ import annotations

from typing import Any

# bert-base-cased's config.json.
BERT_BASE_CASED: dict[str, Any] = {
    "model_type": "bert",
    "vocab_size": 28996,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
}
# meta-llama/Llama-2-7b-hf's config.json (the fields the planner reads).
LLAMA_2_7B: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}
