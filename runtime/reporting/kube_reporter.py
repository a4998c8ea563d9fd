"""Report a run to the operator by patching its report ConfigMap (the one object a run may write).

The value under `REPORT_KEY` is the whole `RunReport` as camelCase JSON; the operator
mirrors it into the FineTuneJob's status. Writes are throttled (progress at most every
`min_interval_s`); stage changes and the final report are written at once.

The write goes through the `kubernetes` package's CoreV1Api with the pod's service account
(`kubernetes.config.load_incluster_config`, which re-reads the projected token as it rotates).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import kubernetes.client
import kubernetes.config
from kubetune.runtime.contract import RunIdentity
from kubetune.runtime.contract.common import SHORT_TEXT_MAX_LENGTH
from kubetune.runtime.contract.report import REPORT_KEY, RunReport, Stage, Unavailable, VariantReport

from .base import TrainingProgress, TrialBoard

LOGGER = logging.getLogger(__name__)
# Progress writes at most this often: each is an API request the operator turns into a status update.
DEFAULT_MIN_INTERVAL_S = 5.0
# Attempts for the writes that must land (stage changes, the final report).
FORCED_ATTEMPTS = 3
# Seconds one write may take; a slow API server delays the run by at most this per attempt.
REQUEST_TIMEOUT_S = 10.0
# The report is a JSON merge patch of the ConfigMap's data (the client's default for a patch is a JSON patch).
MERGE_PATCH = "application/merge-patch+json"


def patch_config_map_data(api: Any, name: str, namespace: str, data: dict[str, str]) -> None:
    """Merge `data` into ConfigMap `name`'s data (one request, REQUEST_TIMEOUT_S at most); raises what the API does."""
    api.patch_namespaced_config_map(
        name, namespace, {"data": data}, _content_type=MERGE_PATCH, _request_timeout=REQUEST_TIMEOUT_S
    )


class ConfigMapReporter:
    """Keeps a RunReport up to date and patches it into ConfigMap `name` in `namespace`.

    `api` is a `kubernetes.client.CoreV1Api` (see `config_map_api`; tests pass anything with its
    `patch_namespaced_config_map`). A failed write is logged and never fails the run: the report
    is how the run is observed, not part of its result.
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
        data = {REPORT_KEY: json.dumps(self.report.to_wire(), sort_keys=True)}
        for attempt in range(FORCED_ATTEMPTS if force else 1):
            try:
                patch_config_map_data(self.api, self.name, self.namespace, data)
            except Exception as error:  # ApiException for a refusal; urllib3 and socket errors when unreachable
                LOGGER.warning(
                    "cannot write the run report to %s/%s: %s", self.namespace, self.name, described_api_error(error)
                )
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
        report.baseline = result.baseline
        report.decisions = result.decisions
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


def config_map_api(configuration: kubernetes.client.Configuration) -> kubernetes.client.CoreV1Api:
    """The client the reporter writes through: straight to the API server, one attempt per write.

    No proxy (a run's HTTPS_PROXY is for the model hub and storage, never the cluster's API), and
    no retries below the reporter's own, so that a write gives up within its bounded attempts.
    """
    configuration.proxy = None
    configuration.retries = 0
    return kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(configuration))


def in_cluster_api() -> kubernetes.client.CoreV1Api:
    """The pod's service account: KUBERNETES_SERVICE_HOST/PORT and the mounted token and CA.

    Raises kubernetes.config.ConfigException, saying what is missing, outside a pod.
    """
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_incluster_config(client_configuration=configuration, try_refresh_token=True)  # type: ignore[no-untyped-call]
    return config_map_api(configuration)


def kubernetes_reporter(identity: RunIdentity) -> ConfigMapReporter | None:
    """A reporter for the run's report ConfigMap with in-cluster credentials; None when the run has none."""
    if not identity.report_config_map or not identity.namespace:
        return None
    return ConfigMapReporter(in_cluster_api(), identity.report_config_map, identity.namespace)


def described_api_error(error: Exception) -> str:
    """An API refusal as its status, reason and the server's message (not the answer's headers)."""
    if not isinstance(error, kubernetes.client.ApiException):
        return str(error)
    message = error.body or ""
    with contextlib.suppress(ValueError, TypeError, AttributeError):  # not a Status: the body as it is
        message = json.loads(message).get("message", message)
    return f"{error.status} {error.reason}: {message}"
