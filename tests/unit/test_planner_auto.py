"""The planner's auto values and its suggestions for a plan that does not fit."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from kubetune.runtime.contract import Method, Precision, Task
from kubetune.runtime.contract.decisions import Decision
from kubetune.runtime.planner import (
    DeviceKind,
    NothingFitsError,
    PlanInput,
    Sharding,
    Topology,
    does_not_fit_message,
    gpu_type,
    quantile,
    resolve_batch,
    resolve_precision,
    resolve_sequence_length,
    shape_from_config,
    suggestions,
    total_bytes,
)

from .model_configs import LLAMA_2_7B

GIB = 2**30


def _llama(method: str = "lora", **changes: Any) -> PlanInput:
    fields: dict[str, Any] = {
        "shape": shape_from_config(LLAMA_2_7B),
        "task": Task.CAUSAL_LM,
        "method": Method.model_validate({"type": method}),
        "batch_size": 1,
        "sequence_length": 1024,
        "precision": Precision.BF16,
    }
    return PlanInput(**{**fields, **changes})


def test_quantile_is_the_nearest_rank() -> None:
    assert quantile(list(range(1, 101)), 0.95) == 95
    assert quantile([5, 1, 3], 0.5) == 3
    assert quantile([7], 0.95) == 7
    with pytest.raises(ValueError, match="no token lengths"):
        quantile([], 0.95)
    with pytest.raises(ValueError, match="quantile"):
        quantile([1], 0)


def test_sequence_length_covers_the_quantile_rounded_up_to_eight() -> None:
    lengths = [100] * 900 + [117] * 50 + [400] * 50  # p95 is 117
    decision = resolve_sequence_length(lengths, max_positions=512)
    assert decision.field == "spec.hyperparameters.maxSequenceLength"
    assert decision.value == 120
    assert decision.reason.startswith("p95 of 1,000 training texts is 117 tokens")
    assert resolve_sequence_length(lengths, 512, q=0.5).value == 104
    assert resolve_sequence_length([3, 4], 512).value == 8  # never below 8


def test_sequence_length_is_capped_by_the_models_positions() -> None:
    decision = resolve_sequence_length([1000] * 10, max_positions=512)
    assert decision.value == 512
    assert "capped at the model's 512 positions" in decision.reason


def test_precision_is_bf16_only_where_the_device_has_it() -> None:
    assert resolve_precision(gpu_type("A100-80GB"), DeviceKind.CUDA).value == "bf16"
    t4 = resolve_precision(gpu_type("T4"), DeviceKind.CUDA)
    assert t4.value == "fp32"
    assert "T4 has no bf16" in t4.reason
    assert resolve_precision(None, DeviceKind.CUDA).value == "fp32"
    assert resolve_precision(gpu_type("H100-SXM"), DeviceKind.CPU).value == "fp32"
    # fp16 is never chosen, whatever the GPU.
    assert all(resolve_precision(gpu, DeviceKind.CUDA).value != "fp16" for gpu in map(gpu_type, ["T4", "V100"]))


def test_decisions_are_camel_case_on_the_wire() -> None:
    decision = Decision(field="spec.hyperparameters.batchSize", value=4, reason="fits")
    assert Decision.model_validate_json(decision.model_dump_json(by_alias=True)) == decision
    assert resolve_batch(_llama(), 80 * GIB).model_dump(by_alias=True)["gradientAccumulationSteps"] == 1


def test_batch_is_the_largest_that_fits() -> None:
    budget = gpu_type("A100-80GB").memory_bytes
    chosen = resolve_batch(_llama(), budget)
    batch = chosen.batch_size
    assert batch > 1
    assert total_bytes(replace(_llama(), batch_size=batch)) <= budget
    assert total_bytes(replace(_llama(), batch_size=batch + 1)) > budget
    assert not chosen.gradient_checkpointing
    assert chosen.decisions[0].value == batch


def test_batch_with_an_effective_batch_accumulates_the_rest() -> None:
    budget = gpu_type("L4").memory_bytes
    two = replace(_llama(), topology=Topology(workers=2))
    chosen = resolve_batch(two, budget, effective_batch=64)
    expected_steps = -(-64 // (chosen.batch_size * 2))
    assert chosen.gradient_accumulation_steps == expected_steps
    assert chosen.batch_size * 2 * chosen.gradient_accumulation_steps >= 64
    # Room for more than the effective batch: the batch stops at its share.
    small = resolve_batch(_llama(sequence_length=64), gpu_type("H200").memory_bytes, effective_batch=8)
    assert (small.batch_size, small.gradient_accumulation_steps) == (8, 1)


def test_checkpointing_turns_on_only_when_it_makes_batch_one_fit() -> None:
    full = _llama("full", sequence_length=4096)
    without = total_bytes(full)
    with_checkpointing = total_bytes(replace(full, gradient_checkpointing=True))
    assert with_checkpointing < without
    budget = (without + with_checkpointing) // 2  # fits only with checkpointing
    chosen = resolve_batch(full, budget)
    assert chosen.gradient_checkpointing
    assert chosen.decisions[-1].value is True
    assert "not even batch 1 fits" in chosen.decisions[-1].reason
    assert not resolve_batch(full, without + GIB).gradient_checkpointing
    # Asked for in the spec but left to the plan: off when it is not needed.
    assert not resolve_batch(replace(full, gradient_checkpointing=True), without + GIB).gradient_checkpointing
    qlora = resolve_batch(_llama("qlora"), 80 * GIB)
    assert qlora.gradient_checkpointing and "qlora" in qlora.decisions[-1].reason
    with pytest.raises(NothingFitsError):
        resolve_batch(full, with_checkpointing - GIB)
    with pytest.raises(NothingFitsError):
        resolve_batch(full, budget, checkpointing_auto=False)


def test_suggestions_fit_when_planned_again() -> None:
    l4 = gpu_type("L4")
    full = _llama("full", batch_size=4)
    assert total_bytes(full) > l4.memory_bytes
    found = suggestions(full, l4)
    assert found
    assert {"spec.method.type": "qlora"} in [s.changes for s in found]
    for suggestion in found:
        assert suggestion.total_bytes <= gpu_type(suggestion.gpu).memory_bytes
    message = does_not_fit_message(full, l4, found)
    assert message.startswith(f"needs {total_bytes(full) / GIB:.1f} GiB per GPU, an L4 has 24: fits with ")
    assert "method qlora" in message


def test_suggestions_include_the_fewest_fsdp_gpus_and_a_larger_gpu() -> None:
    a100 = gpu_type("A100-40GB")
    full = _llama("full", batch_size=2, gradient_checkpointing=True)
    assert total_bytes(full) > a100.memory_bytes
    changes = [s.changes for s in suggestions(full, a100)]
    assert changes == [
        {"spec.method.type": "lora"},
        {"spec.method.type": "qlora"},
        {"spec.resources.gpusPerWorker": 2, "spec.resources.sharding": "fsdp"},
        {"spec.resources.workers": 2, "spec.resources.sharding": "fsdp"},
        {"spec.resources.gpuType": "A100-80GB"},
    ]
    sharded = replace(full, topology=Topology(1, 2, Sharding.FSDP))
    assert total_bytes(sharded) <= a100.memory_bytes < total_bytes(replace(full, topology=Topology(1, 2)))
    # On a GPU it nearly fits, a smaller batch and a shorter sequence come first.
    h100 = gpu_type("H100-SXM")
    found = suggestions(replace(full, batch_size=3), h100)
    assert list(found[0].changes) == ["spec.hyperparameters.batchSize"]
    assert any("spec.hyperparameters.maxSequenceLength" in s.changes for s in found)
    for suggestion in found:
        assert suggestion.total_bytes <= gpu_type(suggestion.gpu).memory_bytes


def test_sharding_with_checkpointing_is_suggested_where_neither_alone_fits() -> None:
    l4 = gpu_type("L4")
    full = _llama("full", batch_size=4)
    found = [s.changes for s in suggestions(full, l4)]
    both = next(c for c in found if len(c) == 3)
    assert both["spec.hyperparameters.gradientCheckpointing"] is True
    count = int(both["spec.resources.gpusPerWorker"])
    assert total_bytes(replace(full, topology=Topology(1, count, Sharding.FSDP))) > l4.memory_bytes
    assert total_bytes(replace(full, gradient_checkpointing=True)) > l4.memory_bytes
    assert total_bytes(replace(full, topology=Topology(1, count, Sharding.FSDP), gradient_checkpointing=True)) <= (
        l4.memory_bytes
    )
    # Fewer GPUs do not do it.
    fewer = replace(full, topology=Topology(1, count // 2, Sharding.FSDP), gradient_checkpointing=True)
    assert total_bytes(fewer) > l4.memory_bytes


def test_a_plan_nothing_rescues_says_so() -> None:
    t4 = gpu_type("T4")
    huge = PlanInput(
        shape=shape_from_config({**LLAMA_2_7B, "num_hidden_layers": 2000}),
        task=Task.CAUSAL_LM,
        method=Method.model_validate({"type": "full"}),
        batch_size=1,
        sequence_length=8,
    )
    found = suggestions(huge, t4, gpus=(t4,))
    assert found == []
    assert "no single change" in does_not_fit_message(huge, t4, found)
