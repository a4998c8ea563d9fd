"""torchao int8 layers swapped for CPU int8 kernels: the same int8 weights, the same answers, faster on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from kubetune.runtime.contract import Compression, Task
from kubetune.runtime.variants.int8 import Int8Embedding, Int8Linear, quantize_folder, use_int8_kernels
from kubetune.runtime.variants.load import load_variant
from torch import nn

pytestmark = pytest.mark.runtime


class TinyClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(50, 32)
        self.hidden = nn.Linear(32, 64)
        self.head = nn.Linear(64, 8, bias=False)
        # Weights like a transformer's (normal, std 0.02). Uniform ones would fill the int8 range
        # evenly, and without VNNI the CPU's 16-bit pair sums saturate far more often than in real models.
        for parameter in self.parameters():
            nn.init.normal_(parameter, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = self.head(torch.relu(self.hidden(self.embedding(ids))))
        return output


def quantized(linear_config: object) -> tuple[TinyClassifier, TinyClassifier]:
    """A float model and its torchao int8 copy (linears per `linear_config`, the embedding weight-only)."""
    from torchao.quantization import IntxWeightOnlyConfig, quantize_  # type: ignore[import-untyped]
    from torchao.quantization.granularity import PerAxis  # type: ignore[import-untyped]

    torch.manual_seed(0)
    reference = TinyClassifier().eval()
    model = TinyClassifier().eval()
    model.load_state_dict(reference.state_dict())
    quantize_(model, linear_config)
    quantize_(
        model,
        IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
        filter_fn=lambda module, _: isinstance(module, nn.Embedding),
    )
    return reference, model


@torch.no_grad()
def test_dynamic_int8_layers_run_on_cpu_kernels_with_the_same_weights() -> None:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    reference, model = quantized(Int8DynamicActivationInt8WeightConfig())
    ids = torch.randint(0, 50, (4, 12))
    torchao_output = model(ids)
    weight: Any = model.hidden.weight  # a torchao Int8Tensor
    int8_hidden = weight.qdata.clone()

    assert use_int8_kernels(model) == 3
    assert isinstance(model.hidden, Int8Linear) and isinstance(model.head, Int8Linear)
    assert isinstance(model.embedding, Int8Embedding)
    # The embedding keeps torchao's int8 rows; the lookup dequantizes only the rows asked for.
    assert model.embedding.qdata.dtype == torch.int8
    # The packed weight holds exactly torchao's int8 values.
    unpacked, _ = torch.ops.quantized.linear_unpack(model.hidden.packed)
    assert torch.equal(unpacked.int_repr(), int8_hidden)

    swapped_output = model(ids)
    expected = reference(ids)
    scale = expected.abs().max()
    # Both quantize activations (per token in torchao, per tensor here): close to float, and to each other.
    assert (swapped_output - expected).abs().max() < 0.05 * scale
    assert (swapped_output - torchao_output).abs().max() < 0.05 * scale


def test_weight_only_linears_keep_float_activations() -> None:
    from torchao.quantization import Int8WeightOnlyConfig

    _, model = quantized(Int8WeightOnlyConfig())
    assert use_int8_kernels(model) == 1  # only the embedding
    assert not isinstance(model.hidden, Int8Linear)
    assert type(model.hidden.weight).__name__ == "Int8Tensor"


def test_a_float_model_is_left_alone() -> None:
    model = TinyClassifier()
    assert use_int8_kernels(model) == 0
    assert type(model.hidden) is nn.Linear


@torch.no_grad()
def test_an_exported_int8_variant_loads_onto_kernels_and_computes_like_fp32(model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = tmp_path / "fp32"
    AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3).save_pretrained(source)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(source)
    quantize_folder(source, tmp_path / "int8", Task.TEXT_CLASSIFICATION, Compression())

    fp32 = load_variant(source, Task.TEXT_CLASSIFICATION)
    int8 = load_variant(tmp_path / "int8", Task.TEXT_CLASSIFICATION)
    swapped = [module for module in int8.modules() if isinstance(module, (Int8Linear, Int8Embedding))]
    assert len(swapped) == 6 * 6 + 2 + 3  # six linears per layer, pooler and classifier; three embedding tables
    tokenizer = AutoTokenizer.from_pretrained(source)
    batch = tokenizer(
        ["the soup needs more salt", "rain is expected tomorrow", "the striker scored twice", "rates went up"],
        padding=True,
        return_tensors="pt",
    )
    # The classifier head is untrained here; compare what the encoder computes, token by token.
    expected = fp32(**batch, output_hidden_states=True).hidden_states[-1]
    actual = int8(**batch, output_hidden_states=True).hidden_states[-1]
    similarity = torch.nn.functional.cosine_similarity(actual, expected, dim=-1)[batch["attention_mask"].bool()]
    assert similarity.min() > 0.96, similarity


@torch.no_grad()
def test_a_tied_causal_lm_quantizes_its_shared_table_once_and_reloads_tied(tmp_path: Path) -> None:
    """tie_word_embeddings with int8 embeddings: the lm_head alias is written once and tied again on load."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    source = tmp_path / "fp32"
    LlamaForCausalLM(config).save_pretrained(source)
    compression = Compression.model_validate({"quantization": {"includeEmbeddings": True}})
    quantize_folder(source, tmp_path / "int8", Task.CAUSAL_LM, compression)

    fp32 = load_variant(source, Task.CAUSAL_LM)
    int8: Any = load_variant(tmp_path / "int8", Task.CAUSAL_LM)
    # Written once: a second copy of the table made the reload compare the two (aten.equal) and fail.
    written = load_file(tmp_path / "int8" / "model.safetensors")
    assert not [name for name in written if name.startswith("lm_head")]
    table = int8.model.embed_tokens
    assert isinstance(table, Int8Embedding)
    # Still one int8 table: the output layer multiplies by the rows the lookup reads.
    assert int8.lm_head.weight.qdata.data_ptr() == table.qdata.data_ptr()

    ids = torch.randint(0, config.vocab_size, (2, 10))
    expected, actual = fp32(ids).logits, int8(ids).logits
    similarity = torch.nn.functional.cosine_similarity(actual, expected, dim=-1)
    assert similarity.min() > 0.96, similarity
    generated = int8.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, 14)
