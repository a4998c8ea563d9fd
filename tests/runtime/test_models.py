"""Fine-tuning methods on the real MiniLM model, and exported variants that load back unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from kubetune.runtime.contract import Method, ModelSource
from kubetune.runtime.io.errors import ModelError
from kubetune.runtime.io.settings import RuntimeSettings
from kubetune.runtime.models import (
    DEFAULT_TARGET_MODULES,
    build_model,
    check_method_fits_machine,
    trainable_parameter_count,
)
from kubetune.runtime.variants.export import VariantFormat, export_variants, merged_copy
from torch import nn

from .conftest import make_spec
from .topics import LABELS, make_examples

pytestmark = pytest.mark.runtime

TEXTS = [r["text"] for r in make_examples(12, seed=5)]


def _build(model_dir: Path, method: dict[str, object]) -> tuple[nn.Module, object]:
    return build_model(
        ModelSource(uri=str(model_dir)), Method.model_validate(method), LABELS, seed=1, settings=RuntimeSettings()
    )


def _trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_lora_adapts_query_and_value_and_trains_the_head(model_dir: Path) -> None:
    model, _ = _build(model_dir, {"type": "lora", "lora": {"rank": 4}})
    names = _trainable(model)
    assert names, "a LoRA model trains something"
    assert all("lora_" in n or "classifier" in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names if "lora_" in n} == {"query", "value"}
    assert any("classifier" in n for n in names)
    trainable, total = trainable_parameter_count(model)
    assert trainable < total / 50


def test_dora_and_custom_targets(model_dir: Path) -> None:
    dora, _ = _build(model_dir, {"type": "dora", "lora": {"targetModules": ["key"]}})
    names = _trainable(dora)
    assert any("lora_magnitude_vector" in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names if "lora_A" in n} == {"key"}
    with pytest.raises(ModelError) as caught:
        _build(model_dir, {"type": "lora", "lora": {"targetModules": ["no_such_module"]}})
    assert caught.value.where == "method.lora.targetModules"


def test_freeze_trains_only_the_top_layers_and_the_head(model_dir: Path) -> None:
    model, _ = _build(model_dir, {"type": "freeze", "freeze": {"trainableLayers": 2}})
    layers = {n.split("encoder.layer.")[1].split(".")[0] for n in _trainable(model) if "encoder.layer." in n}
    assert layers == {"4", "5"}
    assert not any("embeddings" in n for n in _trainable(model))
    assert {"classifier.weight", "bert.pooler.dense.weight"} <= _trainable(model)
    head_only, _ = _build(model_dir, {"type": "freeze", "freeze": {"trainableLayers": 0}})
    assert not any("encoder.layer" in n for n in _trainable(head_only))
    full, _ = _build(model_dir, {"type": "full"})
    assert trainable_parameter_count(full)[0] == trainable_parameter_count(full)[1]


def test_qlora_is_refused_without_a_gpu() -> None:
    with pytest.raises(ModelError, match="qlora needs a CUDA GPU") as caught:
        check_method_fits_machine(Method(type="qlora"), use_gpu=False)
    assert caught.value.where == "method.type"


def test_qlora_on_cpu_fails_before_any_work(model_dir: Path, tmp_path: Path) -> None:
    from kubetune.runtime.recipe.pipeline import RunOptions, run_pipeline

    spec = make_spec(model_dir, tmp_path / "absent.jsonl", tmp_path / "out", method={"type": "qlora"})
    with pytest.raises(ModelError, match="qlora needs a CUDA GPU"):
        run_pipeline(spec, RunOptions(settings=RuntimeSettings(cache_dir=tmp_path / "cache")))
    assert not (tmp_path / "out").exists()  # refused at validation: nothing loaded, nothing written


def test_missing_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as caught:
        build_model(ModelSource(uri=str(tmp_path)), Method(), LABELS, seed=1, settings=RuntimeSettings())
    assert "no config.json" in str(caught.value)


def _logits(model: nn.Module, tokenizer: Any) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        encoded = tokenizer(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
        logits: torch.Tensor = model(**encoded).logits
        return logits


def test_exported_lora_variants_load_back_with_the_same_outputs(model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = _build(model_dir, {"type": "lora", "lora": {"rank": 4}})
    with torch.no_grad():  # a fresh adapter is a no-op (B = 0); move it so the test sees it
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    expected = _logits(model, tokenizer)
    spec = make_spec(model_dir, tmp_path / "t.jsonl", tmp_path)
    variants = export_variants(model, tokenizer, spec, tmp_path, merged_copy(model))
    assert [(v.name, v.format) for v in variants] == [
        ("full", VariantFormat.PEFT_ADAPTER),
        ("merged", VariantFormat.HF),
    ]

    merged = AutoModelForSequenceClassification.from_pretrained(variants[1].folder)
    assert (variants[1].folder / "model.safetensors").is_file()
    assert merged.config.id2label == dict(enumerate(LABELS))
    torch.testing.assert_close(_logits(merged, tokenizer), expected, atol=1e-4, rtol=1e-4)

    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(LABELS))
    adapter = PeftModel.from_pretrained(base, variants[0].folder)
    torch.testing.assert_close(_logits(adapter, tokenizer), expected, atol=1e-5, rtol=1e-5)
    assert (variants[0].folder / "adapter_model.safetensors").is_file()
    assert (variants[0].folder / "tokenizer.json").is_file()


def _tiny_model(model_type: str) -> Any:
    import transformers as t

    small: dict[str, Any] = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    }
    vision: dict[str, Any] = {"image_size": 32, "patch_size": 8, **small}
    built: dict[str, Any] = {
        "camembert": lambda: t.CamembertForSequenceClassification(t.CamembertConfig(vocab_size=100, **small)),
        "mpnet": lambda: t.MPNetForSequenceClassification(t.MPNetConfig(vocab_size=100, **small)),
        "distilbert": lambda: t.DistilBertForSequenceClassification(
            t.DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
        ),
        "albert": lambda: t.AlbertForSequenceClassification(t.AlbertConfig(vocab_size=100, embedding_size=16, **small)),
        "vit": lambda: t.ViTForImageClassification(t.ViTConfig(**vision)),
        "deit": lambda: t.DeiTForImageClassification(t.DeiTConfig(**vision)),
    }
    return built[model_type]()


@pytest.mark.parametrize("model_type", sorted(DEFAULT_TARGET_MODULES))
def test_default_lora_targets_name_modules_the_model_has(model_type: str) -> None:
    """A table entry that names no module of today's transformers would fail every lora run of that type."""
    model = _tiny_model(model_type)
    assert model.config.model_type == model_type
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    assert set(DEFAULT_TARGET_MODULES[model_type]) <= names
