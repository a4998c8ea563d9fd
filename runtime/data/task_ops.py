"""What differs between tasks: how examples become tensors, the loss, and the evaluation metrics.

Every task turns a batch of `Examples` into model inputs plus a `labels` tensor, and
sums what its metrics need into one float64 vector. The vectors of several batches
or workers add up, so metrics over a sharded set equal those over the whole set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from kubetune.runtime.contract import PREFERENCE_OBJECTIVES, Objective, Task
from torch import nn

from .causal import IGNORE_INDEX, fitted, pad_causal
from .images import open_image
from .load import Examples
from .preference import encode_preferences, paired_count, sequence_logps

# What an encoded batch holds besides the model's inputs: the targets, and preference rows' sides and pairs.
NOT_MODEL_INPUTS = frozenset({"labels", "desirable", "pair"})


class TaskOps(Protocol):
    """The task-specific part of training and evaluation."""

    def encode(self, processor: Any, examples: Examples, max_length: int) -> dict[str, torch.Tensor]:
        """Model inputs and a `labels` tensor for a batch."""

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean training loss of a batch."""

    def totals(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the metrics need from an encoded batch, as a vector that adds up over batches and workers."""

    def metrics(self, totals: torch.Tensor) -> dict[str, float]:
        """The metrics from summed totals."""

    def predictions(self, logits: torch.Tensor) -> list[int]:
        """Predicted label ids (classification) or nothing."""


def _class_totals(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Per-class true positives, false positives, false negatives; then the loss sum and the example count."""
    predicted = logits.argmax(dim=-1)
    right = predicted == labels
    true_positive = torch.bincount(labels[right], minlength=num_labels)
    false_positive = torch.bincount(predicted[~right], minlength=num_labels)
    false_negative = torch.bincount(labels[~right], minlength=num_labels)
    loss_sum = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
    counts = torch.cat([true_positive, false_positive, false_negative]).to(torch.float64).cpu()
    return torch.cat([counts, torch.stack([loss_sum.detach().double().cpu(), torch.tensor(float(len(labels)))])])


def classification_metrics_from_totals(totals: torch.Tensor, num_labels: int) -> dict[str, float]:
    """accuracy, macro-F1 over every label (a label never seen nor predicted scores 0) and mean loss."""
    values = totals.tolist()
    n = num_labels
    true_positive, false_positive, false_negative = values[:n], values[n : 2 * n], values[2 * n : 3 * n]
    loss_sum, examples = values[3 * n], values[3 * n + 1]
    scores = []
    for tp, fp, fn in zip(true_positive, false_positive, false_negative, strict=True):
        denominator = 2 * tp + fp + fn
        scores.append(2 * tp / denominator if denominator else 0.0)
    return {
        "accuracy": sum(true_positive) / examples if examples else 0.0,
        "f1": sum(scores) / len(scores) if scores else 0.0,
        "loss": loss_sum / examples if examples else 0.0,
    }


@dataclass(frozen=True)
class _Classification:
    num_labels: int

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.float(), labels)

    def totals(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return _class_totals(logits, batch["labels"], self.num_labels)

    def metrics(self, totals: torch.Tensor) -> dict[str, float]:
        return classification_metrics_from_totals(totals, self.num_labels)

    def predictions(self, logits: torch.Tensor) -> list[int]:
        return [int(i) for i in logits.argmax(dim=-1).tolist()]


@dataclass(frozen=True)
class TextClassification(_Classification):
    def encode(self, processor: Any, examples: Examples, max_length: int) -> dict[str, torch.Tensor]:
        encoded = processor(examples.texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        inputs = {name: value for name, value in encoded.items() if isinstance(value, torch.Tensor)}
        inputs["labels"] = torch.tensor(examples.label_ids, dtype=torch.long)
        return inputs


@dataclass(frozen=True)
class ImageClassification(_Classification):
    def encode(self, processor: Any, examples: Examples, max_length: int) -> dict[str, torch.Tensor]:
        encoded = processor(images=[open_image(image) for image in examples.inputs], return_tensors="pt")
        return {"pixel_values": encoded["pixel_values"], "labels": torch.tensor(examples.label_ids, dtype=torch.long)}


def prompt_and_completion(tokenizer: Any, example: dict[str, Any]) -> tuple[str, str]:
    """The prompt text and the completion it should produce; chats go through the tokenizer's template."""
    if "messages" not in example:
        return str(example["prompt"]), str(example["completion"])
    messages = example["messages"]
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    return str(prompt), str(messages[-1]["content"])


def encode_causal(tokenizer: Any, example: dict[str, Any], max_length: int) -> tuple[list[int], list[int]]:
    """(token ids, labels) of one example: the labels are IGNORE_INDEX over the prompt, so only the completion
    is learned; the completion ends with the end-of-sequence token so the model learns to stop."""
    prompt, completion = prompt_and_completion(tokenizer, example)
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = prefix + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = [*completion_ids, tokenizer.eos_token_id]
    # Over-long examples lose the start of the prompt: the completion is what is learned.
    return fitted(prompt_ids, completion_ids, max_length)


@dataclass(frozen=True)
class CausalLanguageModeling:
    def encode(self, processor: Any, examples: Examples, max_length: int) -> dict[str, torch.Tensor]:
        pairs = [encode_causal(processor, example, max_length) for example in examples.inputs]
        return pad_causal(pairs, processor.pad_token_id if processor.pad_token_id is not None else 0)

    @staticmethod
    def _shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Position t predicts token t+1.
        return logits[:, :-1, :].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        predicted, expected = self._shifted(logits, labels)
        return nn.functional.cross_entropy(predicted, expected, ignore_index=IGNORE_INDEX)

    def totals(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        predicted, expected = self._shifted(logits, batch["labels"])
        loss_sum = nn.functional.cross_entropy(predicted, expected, ignore_index=IGNORE_INDEX, reduction="sum")
        tokens = (expected != IGNORE_INDEX).sum()
        return torch.stack([loss_sum.detach().double().cpu(), tokens.double().cpu()])

    def metrics(self, totals: torch.Tensor) -> dict[str, float]:
        loss_sum, tokens = totals.tolist()
        loss = loss_sum / tokens if tokens else 0.0
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    def predictions(self, logits: torch.Tensor) -> list[int]:
        return []


@dataclass(frozen=True)
class PreferenceModeling(CausalLanguageModeling):
    """Preference pairs and kto examples: scored by each completion's mean log-probability per token."""

    def encode(self, processor: Any, examples: Examples, max_length: int) -> dict[str, torch.Tensor]:
        return encode_preferences(processor, examples.inputs, max_length)

    def totals(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pairs ranked right and pairs; mean log-prob sums and counts of desirable and undesirable completions;
        the desirable completions' summed negative log-likelihood and tokens."""
        sums, counts = sequence_logps(logits, batch["labels"])
        means = sums / counts.clamp(min=1)
        desirable = batch["desirable"].bool()
        pairs = paired_count(batch)
        right = (means[:pairs] > means[pairs : 2 * pairs]).sum()
        values = [
            right,
            torch.tensor(pairs),
            means[desirable].sum(),
            desirable.sum(),
            means[~desirable].sum(),
            (~desirable).sum(),
            -sums[desirable].sum(),
            counts[desirable].sum(),
        ]
        return torch.stack([value.detach().double().cpu() for value in values])

    def metrics(self, totals: torch.Tensor) -> dict[str, float]:
        right, pairs, desirable_sum, desirable, undesirable_sum, undesirable, nll, tokens = totals.tolist()
        loss = nll / tokens if tokens else 0.0
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        if pairs:
            metrics["preferenceAccuracy"] = right / pairs
        if desirable and undesirable:
            metrics["rewardMargin"] = desirable_sum / desirable - undesirable_sum / undesirable
        return metrics


PREFERENCE_TOTALS = 8


def task_ops(task: Task, num_labels: int, objective: Objective = Objective.SFT) -> TaskOps:
    if task == Task.CAUSAL_LM:
        return PreferenceModeling() if objective in PREFERENCE_OBJECTIVES else CausalLanguageModeling()
    if task == Task.IMAGE_CLASSIFICATION:
        return ImageClassification(num_labels)
    return TextClassification(num_labels)


def totals_size(task: Task, num_labels: int, objective: Objective = Objective.SFT) -> int:
    """Length of the totals vector of `task` trained with `objective`."""
    if task != Task.CAUSAL_LM:
        return 3 * num_labels + 2
    return PREFERENCE_TOTALS if objective in PREFERENCE_OBJECTIVES else 2


def auto_class(task: Task) -> Any:
    """The transformers Auto class that loads a model (or an exported variant) of `task`."""
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification

    if task == Task.CAUSAL_LM:
        return AutoModelForCausalLM
    if task == Task.IMAGE_CLASSIFICATION:
        return AutoModelForImageClassification
    return AutoModelForSequenceClassification
