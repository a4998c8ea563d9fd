"""Report a run to the operator by patching its report ConfigMap (the one object a run may write).

The value under `REPORT_KEY` is the whole `RunReport` as camelCase JSON; the operator
mirrors it into the FineTuneJob's status. Writes are throttled (progress at most every
`min_interval_s`); stage changes and the final report are written at once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubetune.runtime.contract import RunIdentity
from kubetune.runtime.contract.common import SHORT_TEXT_MAX_LENGTH
from kubetune.runtime.contract.report import REPORT_KEY, RunReport, Stage, Unavailable, VariantReport

from .base import TrainingProgress, TrialBoard

LOGGER = logging.getLogger(__name__)
# Progress writes at most this often: each is an API request the operator turns into a status update.
DEFAULT_MIN_INTERVAL_S = 5.0
# Attempts for the writes that must land (stage changes, the final report).
FORCED_ATTEMPTS = 3


class ConfigMapReporter:
    """Keeps a RunReport up to date and patches it into ConfigMap `name` in `namespace`.

    `api` is a `kubeapi.ConfigMapPatcher` (or anything with `patch_namespaced_config_map`).
    A failed write is logged and never fails the run: the report is how the run is observed,
    not part of its result.
    """

    def __init__(
        self,
        api: Any,
        name: str,
        namespace: str,
        min_interval_s: float = DEFAULT_MIN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api, self.name, self.namespace = api, name, namespace
        self.min_interval_s = min_interval_s
        self.clock = clock
        self.report = RunReport(stage=Stage.LOAD)
        self.last_write: float | None = None

    def _write(self, force: bool) -> None:
        now = self.clock()
        if not force and self.last_write is not None and now - self.last_write < self.min_interval_s:
            return  # the next write sends the whole report, this update included
        self.report.updated_at = datetime.now(UTC)
        body = {"data": {REPORT_KEY: json.dumps(self.report.to_wire(), sort_keys=True)}}
        for attempt in range(FORCED_ATTEMPTS if force else 1):
            try:
                self.api.patch_namespaced_config_map(self.name, self.namespace, body)
            except Exception as error:  # the client raises ApiException, urllib3 and socket errors
                LOGGER.warning("cannot write the run report to %s/%s: %s", self.namespace, self.name, error)
                if attempt + 1 < FORCED_ATTEMPTS and force:
                    time.sleep(0.5 * (attempt + 1))
                continue
            self.last_write = now
            return

    def stage_started(self, stage: Stage, message: str = "") -> None:
        self.report.stage = stage
        self.report.message = message[:4096] or None
        self._write(force=True)

    def progress(self, progress: TrainingProgress) -> None:
        report = self.report
        report.step, report.total_steps = progress.step, progress.total_steps
        report.epoch, report.loss = max(progress.epoch, 0.0), progress.loss
        self._write(force=progress.step == progress.total_steps)

    def trials(self, board: TrialBoard) -> None:
        completed = board.completed
        if (completed, board.total) == (self.report.trials_completed, self.report.trials_total):
            return  # a trial started or reported: the counts the report carries are unchanged
        self.report.trials_completed, self.report.trials_total = completed, board.total
        self._write(force=completed == board.total)

    def variant(self, name: str, report: VariantReport) -> None:
        pass  # the result carries every variant

    def data(self, splits: dict[str, int], labels: list[str]) -> None:
        pass  # the stage messages say the split sizes

    def metrics(self, split: str, values: dict[str, float], step: int) -> None:
        if split == "test-before":
            self.report.metrics_before = dict(values)
        elif split == "test-after":
            self.report.metrics_after = dict(values)
        else:
            return  # validation metrics during training are TensorBoard's; the report keeps the test numbers
        self._write(force=True)

    def result(self, result: RunReport) -> None:
        report = self.report
        report.stage = Stage.DONE
        report.message = None
        report.metrics_before, report.metrics_after = result.metrics_before, result.metrics_after
        report.variants = result.variants or None
        report.best_variant = result.best_variant
        report.manifest_uri = result.manifest_uri
        report.best_hyperparameters = result.best_hyperparameters
        report.step = result.step
        self._write(force=True)

    def failed(self, message: str, invalid_field: str | None = None, unavailable: Unavailable | None = None) -> None:
        self.report.stage = Stage.FAILED
        self.report.error = message[:8192]
        # The operator stops a run that cannot work rather than let KubeRay retry it.
        self.report.invalid_field = invalid_field[:SHORT_TEXT_MAX_LENGTH] if invalid_field else None
        # ...and lets KubeRay retry one that could not reach what it needs, saying so.
        self.report.unavailable = unavailable
        self._write(force=True)


def kubernetes_reporter(identity: RunIdentity) -> ConfigMapReporter | None:
    """A reporter for the run's report ConfigMap with in-cluster credentials; None when the run has none."""
    if not identity.report_config_map or not identity.namespace:
        return None
    from .kubeapi import ConfigMapPatcher

    return ConfigMapReporter(ConfigMapPatcher.in_cluster(), identity.report_config_map, identity.namespace)
