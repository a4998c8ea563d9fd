"""Preference tuning (dpo, orpo, simpo, kto) end to end on a tiny Llama, and its losses against TRL's."""

from __future__ import annotations

import math
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from kubetune.runtime.contract import DpoLoss, Objective, RunSpec
from kubetune.runtime.data.load import load_data
from kubetune.runtime.data.preference import encode_preferences, mismatched_rows
from kubetune.runtime.io.errors import DataError
from kubetune.runtime.io.settings import RuntimeSettings
from kubetune.runtime.recipe.pipeline import run_pipeline
from kubetune.runtime.training.objectives import dpo_loss, kto_loss, orpo_penalty, simpo_loss

from .conftest import fast_options, finite, make_spec
from .topics import make_examples, write_jsonl

pytestmark = pytest.mark.runtime


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .tiny import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _pairs(count: int, chat: bool = False) -> list[dict[str, Any]]:
    """A topic question, its topic as the chosen answer and another topic as the rejected one."""
    rng = random.Random(5)
    records: list[dict[str, Any]] = []
    for example in make_examples(count, seed=13):
        question = f"topic of: {example['text']}"
        wrong = rng.choice([t for t in ("sports", "finance", "weather", "cooking") if t != example["label"]])
        if chat:
            user = [{"role": "user", "content": question}]
            records.append(
                {
                    "chosen": [*user, {"role": "assistant", "content": example["label"]}],
                    "rejected": [*user, {"role": "assistant", "content": wrong}],
                }
            )
        else:
            records.append({"prompt": question, "chosen": example["label"], "rejected": wrong})
    return records


# Adapters on a random tiny model need a bolder step; each objective's usual beta.
RUNS: dict[Objective, tuple[dict[str, Any], dict[str, Any], float]] = {
    Objective.DPO: (
        {"type": "lora", "lora": {"rank": 8, "targetModules": ["q_proj", "v_proj", "lm_head"]}},
        {"beta": 0.5},
        5e-2,
    ),
    Objective.ORPO: ({"type": "full"}, {"beta": 0.5}, 5e-3),
    Objective.SIMPO: ({"type": "lora", "lora": {"rank": 8}}, {"beta": 2.0, "simpoGamma": 0.5}, 2e-2),
    Objective.KTO: ({"type": "full"}, {"beta": 0.5}, 5e-3),
}


@pytest.mark.parametrize("objective", list(RUNS), ids=[o.value for o in RUNS])
def test_a_preference_run_learns_the_preferred_answers(
    objective: Objective, ray_session: str, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import (  # type: ignore[import-untyped]
        EventAccumulator,
    )

    method, preference, learning_rate = RUNS[objective]
    train = write_jsonl(tmp_path / "pairs.jsonl", _pairs(320, chat=objective == Objective.DPO))
    spec = make_spec(
        tiny_llama_dir,
        train,
        tmp_path / "out",
        model={"uri": str(tiny_llama_dir), "task": "causal-lm"},
        method={**method, "objective": objective.value, "preference": preference},
        hyperparameters={"epochs": 4, "batchSize": 16, "learningRate": learning_rate, "maxSequenceLength": 48},
    )
    result = run_pipeline(spec, fast_options(tmp_path / "out", workers=2))
    before, after = finite(result.metrics_before), finite(result.metrics_after)
    assert {"preferenceAccuracy", "rewardMargin", "loss", "perplexity"} <= set(after)
    assert after["preferenceAccuracy"] >= before["preferenceAccuracy"] + 0.2, (objective, before, after)
    assert after["rewardMargin"] > before["rewardMargin"], (before, after)
    assert result.tensorboard_uri is not None
    events = EventAccumulator(result.tensorboard_uri)
    events.Reload()
    losses = [event.value for event in events.Scalars("train/loss")]
    assert len(losses) > 4 and max(losses[-3:]) < losses[0], losses


def test_preference_records_are_checked_by_line_and_field(tiny_llama_dir: Path, tmp_path: Path) -> None:
    def loading(records: list[dict[str, Any]], objective: str = "dpo") -> DataError:
        train = write_jsonl(tmp_path / "bad.jsonl", records * 10)
        spec = make_spec(
            tiny_llama_dir,
            train,
            tmp_path / "out",
            model={"uri": str(tiny_llama_dir), "task": "causal-lm"},
            method={"type": "lora", "objective": objective},
        )
        with pytest.raises(DataError) as caught:
            load_data(spec, RuntimeSettings(cache_dir=tmp_path / "cache"))
        return caught.value

    missing = loading([{"prompt": "p", "chosen": "a"}])
    assert missing.where == "data.fields.rejected" and "'rejected' is missing in example 1" in missing.problem
    no_prompt = loading([{"chosen": "a", "rejected": "b"}])
    assert no_prompt.where == "data.fields.prompt"
    bad_message = loading([{"prompt": "p", "chosen": [{"content": "a"}], "rejected": "b"}])
    assert "needs a role and a content" in bad_message.problem
    mixed = loading([{"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}])
    assert "mixes text and chat messages" in mixed.problem
    label = loading([{"prompt": "p", "completion": "a", "label": "maybe"}], objective="kto")
    assert label.where == "data.fields.label" and "true or false" in label.problem


def test_kto_takes_labelled_examples_and_trains_on_pairs_split_in_two(tiny_llama_dir: Path, tmp_path: Path) -> None:
    records: list[dict[str, Any]] = [
        {"prompt": "p", "completion": "a", "label": True},
        {"prompt": "q", "completion": "b", "label": "false"},
    ]
    pairs = _pairs(40)
    cases: list[tuple[str, list[dict[str, Any]]]] = [("single.jsonl", records * 20), ("pairs.jsonl", pairs)]
    for path, rows in cases:
        spec = make_spec(
            tiny_llama_dir,
            write_jsonl(tmp_path / path, rows),
            tmp_path / "out",
            model={"uri": str(tiny_llama_dir), "task": "causal-lm"},
            method={"type": "full", "objective": "kto"},
        )
        data = load_data(spec, RuntimeSettings(cache_dir=tmp_path / "cache"))
        assert all("label" in example for example in data.train.inputs)
        assert {example["label"] for example in data.train.inputs} == {True, False}
    # Held-out pairs stay pairs: preferenceAccuracy needs both completions of one prompt.
    assert all("chosen" in example for example in data.validation.inputs)
    assert len(data.train.inputs) == 2 * round(len(pairs) * 0.8)


def test_a_batch_holds_chosen_rows_then_rejected_rows(tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    records = [
        *_pairs(2, chat=True),
        {"prompt": "topic of: rain", "completion": "weather", "label": True},
    ]
    batch = encode_preferences(tokenizer, records, 64)
    assert batch["pair"].tolist() == [0, 1, 0, 1, -1]
    assert batch["desirable"].tolist() == [True, True, False, False, True]
    completion = [t for t in batch["labels"][0].tolist() if t != -100]
    answer = records[0]["chosen"][-1]["content"]
    assert str(tokenizer.decode(completion, skip_special_tokens=True)).strip() == answer
    # The chat template turned the shared first message into the prompt.
    assert "user : topic of :" in tokenizer.decode(batch["input_ids"][0])
    swapped = mismatched_rows(batch)
    second_completion = [t for t in batch["labels"][1].tolist() if t != -100]
    assert [t for t in swapped["labels"][0].tolist() if t != -100] == [
        t for t in batch["labels"][4].tolist() if t != -100
    ]
    assert [t for t in swapped["labels"][2].tolist() if t != -100] == second_completion


def _trl_self(**settings: Any) -> SimpleNamespace:
    return SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), label_smoothing=0.0, **settings)


def test_the_losses_agree_with_trls() -> None:
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    torch.manual_seed(0)
    chosen, rejected = -torch.rand(6) * 3, -torch.rand(6) * 3  # mean log-probs per token
    # TRL's methods read only these settings of their trainer; the inputs are plain float tensors.
    orpo_terms = ORPOTrainer.odds_ratio_loss(_trl_self(beta=0.3), chosen, rejected)[0]  # type: ignore[arg-type]
    assert torch.allclose(orpo_penalty(chosen, rejected, 0.3), -orpo_terms.mean())
    simpo_settings = _trl_self(beta=2.0, simpo_gamma=0.5, loss_type="simpo", alpha=0.0)
    trl_simpo = CPOTrainer.cpo_loss(simpo_settings, chosen, rejected)  # type: ignore[arg-type]
    assert torch.allclose(simpo_loss(chosen, rejected, 2.0, 0.5), trl_simpo[0].mean())
    # DPO and KTO keep their losses inside their trainers' steps: the papers' forms, written out.
    chosen_ratio, rejected_ratio, tokens = torch.tensor([1.0, -0.5]), torch.tensor([0.2, 0.4]), torch.tensor([2, 4])
    sigmoid = -torch.nn.functional.logsigmoid(0.1 * (chosen_ratio - rejected_ratio)).mean()
    assert torch.allclose(dpo_loss(chosen_ratio, rejected_ratio, tokens, tokens, 0.1, DpoLoss.SIGMOID), sigmoid)
    ipo = (((chosen_ratio - rejected_ratio) / tokens - 1 / 0.2) ** 2).mean()
    assert torch.allclose(dpo_loss(chosen_ratio, rejected_ratio, tokens, tokens, 0.1, DpoLoss.IPO), ipo)
    desirable = torch.tensor([True, False])
    expected = (
        (1 - torch.sigmoid(torch.tensor(0.1 * (1.0 - 0.3)))) + 2 * (1 - torch.sigmoid(torch.tensor(0.1 * 0.7)))
    ) / 2
    assert math.isclose(
        float(kto_loss(torch.tensor([1.0, -0.4]), desirable, torch.tensor(0.3), 0.1, 1.0, 2.0)), expected, rel_tol=1e-6
    )


def test_the_spec_names_what_a_preference_objective_cannot_do(tiny_llama_dir: Path, tmp_path: Path) -> None:
    document: dict[str, Any] = {
        "model": {"uri": str(tiny_llama_dir), "task": "text-classification"},
        "data": {"train": "t.jsonl"},
        "method": {"objective": "dpo"},
        "output": {"uri": str(tmp_path)},
    }
    with pytest.raises(ValueError, match=r"needs model\.task causal-lm"):
        RunSpec.model_validate(document)
    document["model"]["task"] = "causal-lm"
    with pytest.raises(ValueError, match="lossType is only valid with objective dpo"):
        RunSpec.model_validate({**document, "method": {"objective": "orpo", "preference": {"lossType": "ipo"}}})
    with pytest.raises(ValueError, match=r"needs method\.objective sft"):
        RunSpec.model_validate({**document, "data": {"train": "t.jsonl", "packing": True}})
    with pytest.raises(ValueError, match=r"search\.metric preferenceAccuracy does not apply"):
        RunSpec.model_validate(
            {
                **document,
                "method": {},
                "search": {
                    "metric": "preferenceAccuracy",
                    "space": {"learningRate": {"type": "choice", "values": [0.1]}},
                },
            }
        )
    assert RunSpec.model_validate(document).search_metric.value == "rewardMargin"
