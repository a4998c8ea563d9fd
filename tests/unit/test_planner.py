"""The training planner: parameter counts, memory per device, speed, against published figures."""

from __future__ import annotations

from typing import Any

import pytest
from kubetune.runtime.contract import Method, Optimizer, Precision, Task
from kubetune.runtime.planner import (
    GPU_TYPES,
    ConfigError,
    DeviceKind,
    PlanInput,
    Sharding,
    Topology,
    gpu_type,
    method_parameters,
    plan,
    shape_from_config,
)

from .model_configs import BERT_BASE_CASED, LLAMA_2_7B

MIB, GIB = 2**20, 2**30

# Meta's published parameter count of Llama 2 7B as transformers builds it (LlamaForCausalLM).
LLAMA_2_7B_PARAMETERS = 6_738_415_616


def _request(config: dict[str, Any], method: str | Method = "full", **changes: Any) -> PlanInput:
    fields: dict[str, Any] = {
        "shape": shape_from_config(config),
        "task": Task.CAUSAL_LM if config["model_type"] == "llama" else Task.TEXT_CLASSIFICATION,
        "method": method if isinstance(method, Method) else Method.model_validate({"type": method}),
        "batch_size": 1,
        "sequence_length": 512,
    }
    return PlanInput(**{**fields, **changes})


def test_llama_7b_parameters_match_the_published_count() -> None:
    shape = shape_from_config(LLAMA_2_7B)
    assert shape.total_parameters(Task.CAUSAL_LM, 2) == LLAMA_2_7B_PARAMETERS
    # LoRA r=8 on q_proj and v_proj: 32 layers x 2 x 8 x (4096 + 4096), what peft reports trainable.
    params = method_parameters(shape, Method.model_validate({"type": "lora"}), Task.CAUSAL_LM, 2)
    assert params.trainable == 4_194_304
    assert params.weight_bytes == LLAMA_2_7B_PARAMETERS * 2  # loaded in its checkpoint's float16


def test_bert_base_cased_matches_accelerates_documented_estimate() -> None:
    # https://huggingface.co/docs/accelerate/usage_guides/model_size_estimator: `accelerate estimate-memory
    # bert-base-cased` reports, for float32, "Total Size 413.18 MB" and "Training using Adam 1.61 GB"
    # (binary units: MiB and GiB). The sequence classifier adds a 768x2 classifier to that model.
    result = plan(_request(BERT_BASE_CASED, labels=2), gpus=())
    memory = result.memory
    assert memory.weights_bytes / MIB == pytest.approx(413.18, rel=0.05)
    training = memory.weights_bytes + memory.gradient_bytes + memory.optimizer_bytes
    assert training / GIB == pytest.approx(1.61, rel=0.05)


def test_llama_7b_full_and_lora_memory_per_gpu() -> None:
    # accelerate's estimator: float16 load size = parameters x 2 bytes (12.55 GiB); training with Adam
    # in float32 = 4 x the float32 size (weights, gradients, two moments): 100.4 GiB.
    fp32 = {**LLAMA_2_7B, "torch_dtype": "float32"}
    full = plan(_request(fp32), gpus=()).memory
    static = full.weights_bytes + full.gradient_bytes + full.optimizer_bytes
    assert static / GIB == pytest.approx(4 * LLAMA_2_7B_PARAMETERS * 4 / GIB, rel=0.05)
    assert not plan(_request(fp32), gpus=[gpu_type("H100-SXM")]).gpus[0].fits

    lora = plan(_request(LLAMA_2_7B, "lora", precision=Precision.FP16), gpus=[gpu_type("A100-40GB")])
    assert lora.memory.weights_bytes / GIB == pytest.approx(12.55, rel=0.05)
    assert lora.memory.adapter_bytes == 4_194_304 * 4  # peft keeps adapters in fp32
    assert lora.memory.optimizer_bytes == 2 * lora.memory.adapter_bytes
    assert lora.gpus[0].fits
    assert lora.memory.peak_bytes < 20 * GIB


def test_qlora_stores_the_base_in_about_four_bits() -> None:
    lora = plan(_request(LLAMA_2_7B, "lora"), gpus=()).memory
    qlora = plan(_request(LLAMA_2_7B, "qlora"), gpus=()).memory
    assert qlora.weights_bytes < lora.weights_bytes / 2.5
    assert qlora.weights_bytes > LLAMA_2_7B_PARAMETERS * 0.5 * 0.9


def test_activations_grow_with_batch_and_shrink_with_checkpointing() -> None:
    small = plan(_request(BERT_BASE_CASED, batch_size=4), gpus=()).memory
    large = plan(_request(BERT_BASE_CASED, batch_size=16), gpus=()).memory
    checkpointed = plan(_request(BERT_BASE_CASED, batch_size=16, gradient_checkpointing=True), gpus=()).memory
    assert large.activation_bytes > 3 * small.activation_bytes
    assert checkpointed.activation_bytes < large.activation_bytes / 3


def test_methods_train_fewer_parameters_than_full() -> None:
    shape = shape_from_config(BERT_BASE_CASED)
    counts = {
        name: method_parameters(shape, Method.model_validate({"type": name}), Task.TEXT_CLASSIFICATION, 2)
        for name in ("full", "lora", "dora", "freeze")
    }
    assert counts["full"].trainable == shape.total_parameters(Task.TEXT_CLASSIFICATION, 2)
    assert counts["lora"].trainable < counts["dora"].trainable < counts["freeze"].trainable < counts["full"].trainable
    # freeze trains the top 2 layers and the head (pooler and classifier).
    head = shape.head_parameters(Task.TEXT_CLASSIFICATION, 2)
    assert counts["freeze"].trainable == 2 * shape.layer_parameters + head


def test_optimizer_state_follows_the_optimizer() -> None:
    adam = plan(_request(BERT_BASE_CASED), gpus=()).memory
    sgd = plan(_request(BERT_BASE_CASED, optimizer=Optimizer.SGD), gpus=()).memory
    assert adam.optimizer_bytes == 2 * sgd.optimizer_bytes == 2 * adam.gradient_bytes


def test_fsdp_divides_the_state_and_ddp_adds_gradient_buckets() -> None:
    one = plan(_request(BERT_BASE_CASED), gpus=()).memory
    ddp = plan(_request(BERT_BASE_CASED, topology=Topology(workers=4)), gpus=()).memory
    fsdp = plan(_request(BERT_BASE_CASED, topology=Topology(workers=4, sharding=Sharding.FSDP)), gpus=()).memory
    assert ddp.peak_bytes == pytest.approx(one.peak_bytes + one.gradient_bytes, rel=1e-6)
    assert fsdp.weights_bytes == one.weights_bytes // 4
    assert fsdp.optimizer_bytes == one.optimizer_bytes // 4
    assert fsdp.peak_bytes < one.peak_bytes


def test_speed_follows_flops_and_the_gpus_peak() -> None:
    request = _request(LLAMA_2_7B, "full", precision=Precision.BF16, train_tokens=10**8, epochs=2)
    result = plan(request, gpus=[gpu_type("A100-80GB"), gpu_type("H100-SXM"), gpu_type("T4")], mfu=0.5)
    a100, h100, t4 = result.gpus
    # About 6 FLOPs per parameter and token, plus attention.
    assert 6 * LLAMA_2_7B_PARAMETERS < result.flops_per_token < 7 * LLAMA_2_7B_PARAMETERS
    assert a100.step_seconds is not None and h100.step_seconds is not None
    assert a100.step_seconds / h100.step_seconds == pytest.approx(989.5 / 312)
    assert h100.gpu_hours == pytest.approx(2 * 10**8 * result.flops_per_token / (989.5e12 * 0.5) / 3600)
    assert h100.tokens_per_second == pytest.approx(512 / h100.step_seconds)
    assert t4.step_seconds is None  # no bf16 on a T4


def test_lora_and_checkpointing_change_the_flops() -> None:
    full = plan(_request(LLAMA_2_7B), gpus=()).flops_per_token
    lora = plan(_request(LLAMA_2_7B, "lora"), gpus=()).flops_per_token
    checkpointed = plan(_request(LLAMA_2_7B, gradient_checkpointing=True), gpus=()).flops_per_token
    assert lora < full < checkpointed
    assert lora == pytest.approx(full * 4 / 6, rel=0.05)  # no weight gradients


def test_plan_is_camel_case_on_the_wire() -> None:
    wire = plan(_request(BERT_BASE_CASED), gpus=[gpu_type("L4")]).to_wire()
    assert {"peakBytes", "weightsBytes", "activationBytes", "overheadBytes"} <= set(wire["memory"])
    assert {"gpu", "fits", "stepSeconds", "source"} <= set(wire["gpus"][0])
    assert "flopsPerToken" in wire


def test_cpu_plans_have_no_cuda_overhead() -> None:
    cpu = plan(_request(BERT_BASE_CASED, device=DeviceKind.CPU), gpus=()).memory
    assert cpu.overhead_bytes == 0
    assert cpu.total_bytes == cpu.peak_bytes


@pytest.mark.parametrize("missing", ["hidden_size", "num_hidden_layers", "vocab_size", "model_type"])
def test_a_missing_config_key_is_named(missing: str) -> None:
    config = {key: value for key, value in BERT_BASE_CASED.items() if key != missing}
    with pytest.raises(ConfigError, match=missing):
        shape_from_config(config)


def test_unsupported_model_types_and_targets_are_refused() -> None:
    with pytest.raises(ConfigError, match="model_type"):
        shape_from_config({**BERT_BASE_CASED, "model_type": "t5"})
    method = Method.model_validate({"type": "lora", "lora": {"targetModules": ["q_proj"]}})
    with pytest.raises(ValueError, match=r"method\.lora\.targetModules"):
        method_parameters(shape_from_config(BERT_BASE_CASED), method, Task.TEXT_CLASSIFICATION, 2)


def test_every_gpu_has_a_datasheet_and_bf16_only_from_ampere() -> None:
    assert len({gpu.name for gpu in GPU_TYPES}) == len(GPU_TYPES) >= 10
    assert all(gpu.source.startswith("https://") for gpu in GPU_TYPES)
    assert not gpu_type("v100").supports_bf16 and gpu_type("A100-40GB").supports_bf16
    with pytest.raises(ValueError, match="H100-SXM"):
        gpu_type("H1000")


def test_autocast_keeps_half_precision_copies_of_fp32_weights() -> None:
    fp32 = {**LLAMA_2_7B, "torch_dtype": "float32"}
    mixed = plan(_request(fp32, precision=Precision.BF16), gpus=()).memory
    plain = plan(_request(fp32), gpus=()).memory
    # Every matmul weight a gradient passes through is kept in bf16 until its backward: about 2 bytes each.
    assert mixed.activation_bytes - plain.activation_bytes > 1.5 * LLAMA_2_7B_PARAMETERS
    bf16_weights = plan(_request(LLAMA_2_7B, precision=Precision.BF16), gpus=()).memory
    assert bf16_weights.activation_bytes < mixed.activation_bytes - LLAMA_2_7B_PARAMETERS


def test_gradient_accumulation_keeps_gradients_through_the_micro_batches() -> None:
    one = plan(_request(BERT_BASE_CASED, batch_size=32), gpus=()).memory
    accumulated = plan(_request(BERT_BASE_CASED, batch_size=32, gradient_accumulation_steps=4), gpus=()).memory
    assert one.peak_phase == "backward"
    assert accumulated.peak_bytes == one.peak_bytes + one.gradient_bytes


def _objective(method: str, objective: str) -> Method:
    return Method.model_validate({"type": method, "objective": objective})


def test_preference_objectives_plan_their_rows_and_reference() -> None:
    def memory(method: str, objective: str) -> Any:
        return plan(_request(LLAMA_2_7B, batch_size=2, method=_objective(method, objective)), gpus=()).memory

    sft, orpo, dpo_full, dpo_lora = (
        memory("full", "sft"),
        memory("full", "orpo"),
        memory("full", "dpo"),
        memory("lora", "dpo"),
    )
    # A pair runs two rows: chosen and rejected.
    assert orpo.activation_bytes == pytest.approx(
        plan(_request(LLAMA_2_7B, batch_size=4), gpus=()).memory.activation_bytes
    )
    # dpo without adapters keeps a frozen copy of the base; with them, the base is the model with adapters off.
    assert dpo_full.weights_bytes == 2 * sft.weights_bytes
    assert dpo_lora.weights_bytes == memory("lora", "sft").weights_bytes
    # The reference's forward pass (dpo), and kto's three: reference, and both models on mismatched pairs.
    sft_flops = plan(_request(LLAMA_2_7B), gpus=()).flops_per_token
    dpo_flops = plan(_request(LLAMA_2_7B, method=_objective("full", "dpo")), gpus=()).flops_per_token
    kto_flops = plan(_request(LLAMA_2_7B, method=_objective("full", "kto")), gpus=()).flops_per_token
    assert dpo_flops == pytest.approx(sft_flops * 4 / 3, rel=0.02)
    assert kto_flops == pytest.approx(sft_flops * 2, rel=0.02)
