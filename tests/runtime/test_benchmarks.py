"""evaluation.lmEval: an lm-evaluation-harness task from a local folder, scored on every model of a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kubetune.cli.run import judged
from kubetune.operator.api.finetunejob import FineTuneJob, GateReason
from kubetune.operator.api.manifests import parse
from kubetune.runtime.benchmarks import benchmark_metrics
from kubetune.runtime.contract.evaluation import LmEvalSpec
from kubetune.runtime.io.errors import InvalidRunError
from kubetune.runtime.recipe.pipeline import run_pipeline
from kubetune.runtime.reporting.console import results_table
from rich.console import Console

from .conftest import fast_options, finite, make_spec
from .topics import TOPICS, make_examples, write_jsonl

pytestmark = pytest.mark.runtime

NAMES = sorted(TOPICS)
COLLAPSED = "weather"
TASK = """task: topics
dataset_path: json
dataset_kwargs:
  data_files:
    test: topics.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "topic of: {{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama, its tokenizer adding a beginning-of-sequence token only, as causal LMs' tokenizers do.

    lm-evaluation-harness encodes with the tokenizer's special tokens; MiniLM's (BERT's) also ends every
    text with [SEP], which would split a context from its continuation one token off.
    """
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from .tiny import tiny_llama

    folder = tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    bert = AutoTokenizer.from_pretrained(folder)
    backend = bert.backend_tokenizer
    bos = (bert.bos_token, bert.bos_token_id)
    backend.post_processor = TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A $B", special_tokens=[bos])
    special = {"bos_token": bert.bos_token, "eos_token": bert.eos_token, "pad_token": bert.pad_token}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=bert.unk_token, **special)  # type: ignore[no-untyped-call]
    tokenizer.chat_template = bert.chat_template
    tokenizer.save_pretrained(folder)
    plain = bert.encode("rain", add_special_tokens=False)
    assert AutoTokenizer.from_pretrained(folder).encode("rain") == [bert.bos_token_id, *plain]
    return folder


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A multiple-choice task over the four topics, with its data beside it (a relative data_files path)."""
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "topics.yaml").write_text(TASK)
    questions = [
        {"question": example["text"], "choices": NAMES, "answer": NAMES.index(example["label"])}
        for example in make_examples(40, seed=29)
        if example["label"] != COLLAPSED
    ]
    write_jsonl(folder / "topics.jsonl", questions)
    return folder


def _collapsed(count: int) -> list[dict[str, Any]]:
    """Topic questions all answered with one topic, which the task never asks for: a model that learns
    this forgets how to answer the task's questions."""
    return [{"prompt": f"topic of: {e['text']}", "completion": f" {COLLAPSED}"} for e in make_examples(count, seed=31)]


def test_a_run_that_forgets_a_benchmark_task_is_not_promoted(
    ray_session: str, tiny_llama_dir: Path, task_folder: Path, tmp_path: Path
) -> None:
    lm_eval = {"tasks": ["topics"], "taskFolder": str(task_folder), "maxDrop": 0.05}
    spec = make_spec(
        tiny_llama_dir,
        write_jsonl(tmp_path / "sft.jsonl", _collapsed(200)),
        tmp_path / "out",
        model={"uri": str(tiny_llama_dir), "task": "causal-lm"},
        method={"type": "full"},
        hyperparameters={"epochs": 3, "batchSize": 16, "learningRate": 1e-2, "maxSequenceLength": 48},
        compression={"quantization": {"method": "int8-weight-only", "includeEmbeddings": False}},
        evaluation={"lmEval": lm_eval},
    )
    result = run_pipeline(spec, fast_options(tmp_path / "out"))
    assert result.benchmark_metrics == ["topics.acc"]
    before, after = finite(result.metrics_before), finite(result.metrics_after)
    # The base model answers some of them (those of the topic it favours); the collapsed one none.
    assert before["topics.acc"] > after["topics.acc"] + 0.1, (before, after)
    assert after["loss"] < before["loss"]  # it learned what it was taught
    assert result.variants is not None
    assert all("topics.acc" in variant.metrics for variant in result.variants.values())
    console = Console(width=200, record=True)
    console.print(results_table(result))
    assert "topics.acc" in console.export_text()

    document = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "forgets"},
        "spec": {**spec.to_wire(), "output": {"uri": "pvc://runs/forgets"}},
    }
    job = parse(document)
    assert isinstance(job, FineTuneJob)
    verdict = judged(job, result)
    assert (verdict.passed, verdict.reason) == (False, GateReason.BENCHMARK_DROPPED)
    assert verdict.message.startswith("topics.acc fell by "), verdict.message


def test_unknown_tasks_and_folders_are_named(tiny_llama_dir: Path, task_folder: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    with pytest.raises(InvalidRunError) as unknown:
        benchmark_metrics(model, tokenizer, LmEvalSpec(tasks=["topics", "no_such_task"], task_folder=str(task_folder)))
    assert unknown.value.where == "evaluation.lmEval.tasks" and "no_such_task" in unknown.value.problem
    with pytest.raises(InvalidRunError) as missing:
        benchmark_metrics(model, tokenizer, LmEvalSpec(tasks=["topics"], task_folder=str(tmp_path / "nowhere")))
    assert missing.value.where == "evaluation.lmEval.taskFolder"
    scores = benchmark_metrics(model, tokenizer, LmEvalSpec(tasks=["topics"], task_folder=str(task_folder), limit=8))
    assert list(scores) == ["topics.acc"] and 0.0 <= scores["topics.acc"] <= 1.0
    assert json.dumps(scores)  # plain numbers, as a report carries them
