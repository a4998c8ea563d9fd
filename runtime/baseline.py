"""The classical baseline: a model trained in seconds on the run's own split, to show what fine-tuning bought.

Text: TF-IDF over word 1- and 2-grams (sublinear term frequency) and a logistic regression.
Images: a logistic regression on the pixels of each image downsampled to `PIXELS_SIDE` x
`PIXELS_SIDE` (RGB, scaled to zero mean and unit variance). Those pixels need neither the
model nor its processor, cost no GPU and stay a few hundred features whatever the images'
size, and they are what a linear model can use without learned features: enough to tell a
task a linear model solves (digits, colours) from one where fine-tuning pays.

It is fitted on the training split and measured on the test split, as the fine-tuned model
is, with the same metric code (`ConfusionCounts`: accuracy, macro-F1 over every label,
mean cross-entropy). Deterministic (seeded) and bounded, as it runs in the driver (on
a cluster, the Ray head): at most `MAX_TRAIN_TEXTS` or `MAX_TRAIN_IMAGES` training
examples (a seeded sample beyond that, and the report says how many), `MAX_TEXT_FEATURES`
n-grams and `MAX_ITERATIONS` solver iterations.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from typing import Any

from kubetune.runtime.contract import Task
from kubetune.runtime.contract.model import CLASSIFICATION_TASKS
from kubetune.runtime.contract.report import BaselineReport
from kubetune.runtime.data.images import open_image
from kubetune.runtime.data.load import Examples, TaskData
from kubetune.runtime.evaluate import ConfusionCounts

TEXT_MODEL = "tfidf-logistic-regression"
IMAGE_MODEL = "pixels-logistic-regression"
MAX_TRAIN_TEXTS = 50_000
# Each image is decoded to be downsampled: fewer of them than texts keep the fit within seconds.
MAX_TRAIN_IMAGES = 20_000
MAX_TEXT_FEATURES = 100_000
MAX_ITERATIONS = 1000
PIXELS_SIDE = 16
# Probabilities are clipped here before the log, as cross-entropy of a confident wrong guess is unbounded.
MIN_PROBABILITY = 1e-15


def skipped(reason: str) -> BaselineReport:
    return BaselineReport(skipped=reason)


def fit_baseline(task: Task, data: TaskData, seed: int) -> BaselineReport:
    """The classical baseline of a run, or a report that says why there is none."""
    if task not in CLASSIFICATION_TASKS:
        return skipped(f"{task.value} has no classical baseline: it is measured for classification tasks only")
    present = set(data.train.label_ids)
    if len(present) < 2:
        return skipped("the training split holds a single label: a classifier needs two")
    if not len(data.test):
        return skipped("the test split is empty")
    started = time.perf_counter()
    text = task == Task.TEXT_CLASSIFICATION
    train = _bounded(data.train, MAX_TRAIN_TEXTS if text else MAX_TRAIN_IMAGES, seed)
    model, features = (_text_model(seed), _texts) if text else (_image_model(seed), _pixels)
    with warnings.catch_warnings():
        # Within MAX_ITERATIONS the fit is good enough for a baseline; a warning would only alarm.
        warnings.simplefilter("ignore")
        model.fit(features(train), train.label_ids)
        probabilities = model.predict_proba(features(data.test))
    metrics = _metrics(probabilities, [int(c) for c in model.classes_], data.test.label_ids, len(data.labels))
    return BaselineReport(
        model=TEXT_MODEL if text else IMAGE_MODEL,
        metrics=metrics,
        train_examples=len(train),
        test_examples=len(data.test),
        seconds=round(time.perf_counter() - started, 3),
    )


def _bounded(examples: Examples, most: int, seed: int) -> Examples:
    """At most `most` examples: a seeded sample of a larger split, in its order."""
    if len(examples) <= most:
        return examples
    chosen = sorted(random.Random(seed).sample(range(len(examples)), most))
    return examples.subset(chosen)


def _text_model(seed: int) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, max_features=MAX_TEXT_FEATURES)
    return make_pipeline(vectorizer, LogisticRegression(max_iter=MAX_ITERATIONS, random_state=seed))


def _image_model(seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=MAX_ITERATIONS, random_state=seed))


def _texts(examples: Examples) -> list[str]:
    return examples.texts


def _pixels(examples: Examples) -> Any:
    import numpy as np

    rows = [
        np.asarray(open_image(image).resize((PIXELS_SIDE, PIXELS_SIDE)), dtype=np.float32).reshape(-1) / 255.0
        for image in examples.inputs
    ]
    return np.stack(rows)


def _metrics(probabilities: Any, classes: list[int], expected: list[int], num_labels: int) -> dict[str, float]:
    """accuracy, f1 and loss from the predicted probabilities; a label never seen in training gets none."""
    counts = ConfusionCounts.empty(num_labels)
    column = {label: index for index, label in enumerate(classes)}
    predicted = [classes[int(row.argmax())] for row in probabilities]
    loss_sum = 0.0
    for row, truth in zip(probabilities, expected, strict=True):
        probability = float(row[column[truth]]) if truth in column else 0.0
        loss_sum -= math.log(max(probability, MIN_PROBABILITY))
    counts.add(predicted, expected, loss_sum)
    return counts.metrics()
