"""Causal-LM SFT (prompt/completion and chat) and image classification end to end on tiny models."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from kubetune.runtime.data.causal import IGNORE_INDEX
from kubetune.runtime.data.task_ops import encode_causal
from kubetune.runtime.recipe.pipeline import run_pipeline

from .conftest import artifacts, fast_options, finite, make_spec, manifest_file, variants_of
from .topics import make_examples, write_jsonl

pytestmark = pytest.mark.runtime

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .tiny import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _sft_records(count: int, chat: bool) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for example in make_examples(count, seed=11):
        question = f"topic of: {example['text']}"
        if chat:
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": example["label"]}]
            records.append({"messages": messages})
        else:
            records.append({"prompt": question, "completion": example["label"]})
    return records


def test_the_loss_covers_only_the_completion(tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids, labels = encode_causal(tokenizer, {"prompt": "topic of: rain", "completion": "weather"}, 64)
    completion = tokenizer("weather", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert [t for t in labels if t != IGNORE_INDEX] == completion
    assert ids[-len(completion) :] == completion and labels[: len(ids) - len(completion)] == [IGNORE_INDEX] * (
        len(ids) - len(completion)
    )
    chat = {"messages": [{"role": "user", "content": "topic of: rain"}, {"role": "assistant", "content": "weather"}]}
    chat_ids, chat_labels = encode_causal(tokenizer, chat, 64)
    prompt = str(tokenizer.decode([t for t, label in zip(chat_ids, chat_labels, strict=True) if label == IGNORE_INDEX]))
    assert "user" in prompt and prompt.rstrip().endswith("assistant :")
    assert [t for t in chat_labels if t != IGNORE_INDEX] == completion


@pytest.mark.parametrize("chat", [False, True], ids=["prompt-completion", "chat"])
def test_causal_lm_sft_lowers_perplexity(chat: bool, ray_session: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    train = write_jsonl(tmp_path / "sft.jsonl", _sft_records(160, chat))
    spec = make_spec(
        tiny_llama_dir,
        train,
        tmp_path / "out",
        model={"uri": str(tiny_llama_dir), "task": "causal-lm"},
        method={"type": "lora", "lora": {"rank": 8, "targetModules": ["q_proj", "v_proj", "up_proj", "down_proj"]}}
        if chat
        else {"type": "full"},
        # Adapters on a random tiny model need a bolder step than full fine-tuning.
        hyperparameters={"epochs": 3, "batchSize": 16, "learningRate": 3e-2 if chat else 1e-2, "maxSequenceLength": 48},
        compression={"quantization": {"method": "int8-weight-only", "includeEmbeddings": False}},
    )
    result = run_pipeline(spec, fast_options(tmp_path / "out"))
    before, after = finite(result.metrics_before), finite(result.metrics_after)
    assert set(after) == {"loss", "perplexity"}
    assert after["perplexity"] < before["perplexity"] / (2 if chat else 10), (before, after)
    plain = "merged" if chat else "full"
    model = AutoModelForCausalLM.from_pretrained(artifacts(result)[plain])
    assert model.config.model_type == "llama"
    int8 = variants_of(result)["int8"]
    int8_perplexity = int8.metrics["perplexity"]
    assert int8_perplexity is not None
    growth = int8_perplexity / after["perplexity"] - 1
    assert int8.accepted == (growth <= spec.compression.max_accuracy_drop)


def _write_images(root: Path, per_class: int) -> Path:
    from PIL import Image

    rng = random.Random(5)
    for label, colour in COLOURS.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noisy = tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in colour)
            Image.new("RGB", (32, 32), noisy).save(root / label / f"{i}.png")
    return root


def test_image_classification_from_an_image_folder(ray_session: str, tmp_path: Path) -> None:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from .tiny import tiny_vit

    model_dir = tiny_vit(tmp_path / "vit")
    images = _write_images(tmp_path / "images", per_class=30)
    spec = make_spec(
        model_dir,
        images,
        tmp_path / "out",
        model={"uri": str(model_dir), "task": "image-classification"},
        data={"format": "imagefolder", "split": {"validationFraction": 0.2, "testFraction": 0.2}},
        method={"type": "full"},
        hyperparameters={"epochs": 3, "batchSize": 8, "learningRate": 3e-3},
        compression={"quantization": {"method": "none"}},
    )
    result = run_pipeline(spec, fast_options(tmp_path / "out"))
    before, after = finite(result.metrics_before), finite(result.metrics_after)
    assert after["accuracy"] >= 0.9, after
    assert after["accuracy"] > before["accuracy"]
    folder = artifacts(result)["full"]
    model = AutoModelForImageClassification.from_pretrained(folder)
    assert model.config.id2label == {0: "blue", 1: "green", 2: "red"}
    processor = AutoImageProcessor.from_pretrained(folder)  # type: ignore[no-untyped-call]
    assert processor.size == {"height": 32, "width": 32}
    manifest = json.loads(manifest_file(result).read_text())
    assert manifest["task"] == "image-classification"


def test_image_data_errors(tmp_path: Path) -> None:
    from kubetune.runtime.data.load import load_data
    from kubetune.runtime.io.errors import DataError
    from kubetune.runtime.io.settings import RuntimeSettings

    images = _write_images(tmp_path / "images", per_class=4)
    (images / "red" / "broken.png").write_bytes(b"not an image")
    spec = make_spec(
        tmp_path,
        images,
        tmp_path / "out",
        model={"uri": str(tmp_path), "task": "image-classification"},
        data={"format": "imagefolder"},
    )
    with pytest.raises(DataError, match="cannot read the image") as caught:
        load_data(spec, RuntimeSettings())
    assert "red/broken.png" in str(caught.value)


def test_causal_data_errors(tmp_path: Path) -> None:
    from kubetune.runtime.data.load import load_data
    from kubetune.runtime.io.errors import DataError
    from kubetune.runtime.io.settings import RuntimeSettings

    model = {"uri": str(tmp_path), "task": "causal-lm"}
    neither = write_jsonl(tmp_path / "a.jsonl", [{"text": "hello"}] * 20)
    with pytest.raises(DataError) as caught:
        load_data(make_spec(tmp_path, neither, tmp_path / "o", model=model), RuntimeSettings())
    assert caught.value.where == "data.fields.prompt" and "'messages'" in str(caught.value)
    no_completion = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "hi"}] * 20)
    with pytest.raises(DataError) as caught:
        load_data(make_spec(tmp_path, no_completion, tmp_path / "o", model=model), RuntimeSettings())
    assert caught.value.where == "data.fields.completion"
    user_last = [{"messages": [{"role": "user", "content": "hi"}]}] * 20
    with pytest.raises(DataError, match="last message must be the assistant"):
        load_data(
            make_spec(tmp_path, write_jsonl(tmp_path / "c.jsonl", user_last), tmp_path / "o", model=model),
            RuntimeSettings(),
        )
