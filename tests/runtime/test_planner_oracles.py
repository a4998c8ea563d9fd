"""The planner's parameter counts and sizes against transformers, peft and accelerate on the meta device.

No weights are loaded: accelerate's `init_empty_weights` builds each model from its config,
as `accelerate estimate-memory` does, and its `calculate_maximum_sizes` and
`estimate_training_usage` are the oracle for the load size and the training size with Adam.
"""

from __future__ import annotations

from typing import Any

import pytest
from kubetune.runtime.contract import Method, Task
from kubetune.runtime.planner import method_parameters, plan, shape_from_config

from ..unit.model_configs import BERT_BASE_CASED, LLAMA_2_7B
from ..unit.test_planner import _request

pytestmark = pytest.mark.runtime

QWEN2_SMALL: dict[str, Any] = {
    "model_type": "qwen2",
    "vocab_size": 1000,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
ROBERTA_SMALL: dict[str, Any] = {
    "model_type": "roberta",
    "vocab_size": 1000,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "max_position_embeddings": 130,
    "type_vocab_size": 1,
}
VIT_BASE: dict[str, Any] = {
    "model_type": "vit",
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "image_size": 224,
    "patch_size": 16,
}
CASES = [
    (BERT_BASE_CASED, Task.TEXT_CLASSIFICATION),
    (ROBERTA_SMALL, Task.TEXT_CLASSIFICATION),
    (LLAMA_2_7B, Task.CAUSAL_LM),
    (LLAMA_2_7B, Task.TEXT_CLASSIFICATION),
    (QWEN2_SMALL, Task.CAUSAL_LM),
    (VIT_BASE, Task.IMAGE_CLASSIFICATION),
]
LABELS = 3


def _empty_model(config: dict[str, Any], task: Task) -> Any:
    from accelerate import init_empty_weights
    from kubetune.runtime.data.task_ops import auto_class
    from transformers import AutoConfig

    settings = {key: value for key, value in config.items() if key != "model_type"}
    hf_config = AutoConfig.for_model(config["model_type"], **settings)
    if task != Task.CAUSAL_LM:
        hf_config.num_labels = LABELS
    with init_empty_weights():
        model = auto_class(task).from_config(hf_config)
    model.tie_weights()  # on the meta device the shared embedding is not tied at construction
    return model


@pytest.mark.parametrize(("config", "task"), CASES, ids=[f"{c['model_type']}-{t.value}" for c, t in CASES])
def test_parameter_counts_equal_transformers(config: dict[str, Any], task: Task) -> None:
    model = _empty_model(config, task)
    expected = sum(p.numel() for p in model.parameters())  # shared (tied) weights count once
    assert shape_from_config(config).total_parameters(task, LABELS) == expected


def test_sizes_match_accelerates_estimator_for_a_7b_llama() -> None:
    from accelerate.commands.estimate import estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes

    fp32 = {**LLAMA_2_7B, "torch_dtype": "float32"}
    total_size, _ = calculate_maximum_sizes(_empty_model(fp32, Task.CAUSAL_LM))
    memory = plan(_request(fp32), gpus=()).memory
    assert memory.weights_bytes == pytest.approx(total_size, rel=0.05)
    training = memory.weights_bytes + memory.gradient_bytes + memory.optimizer_bytes
    assert training == pytest.approx(estimate_training_usage(total_size, "float32")["step"], rel=0.05)


@pytest.mark.parametrize("method", ["lora", "dora", "freeze"])
@pytest.mark.parametrize(
    ("config", "task"), [(BERT_BASE_CASED, Task.TEXT_CLASSIFICATION), (QWEN2_SMALL, Task.CAUSAL_LM)]
)
def test_trainable_counts_equal_the_runtimes_method(config: dict[str, Any], task: Task, method: str) -> None:
    from kubetune.runtime.models import apply_method, trainable_parameter_count

    spec = Method.model_validate({"type": method})
    model = apply_method(_empty_model(config, task), spec, task)
    trainable, total = trainable_parameter_count(model)
    params = method_parameters(shape_from_config(config), spec, task, LABELS)
    assert params.trainable == trainable
    assert params.total + params.adapter_parameters == total
