"""Prometheus metrics of the operator, served on an HTTP port."""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter("kubetune_reconciles_total", "Reconciles by kind and result.", ["kind", "result"])
RECONCILE_SECONDS = Histogram(
    "kubetune_reconcile_duration_seconds",
    "Time spent in one reconcile.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RECONCILE_ERRORS = Counter("kubetune_reconcile_errors_total", "Reconciles that failed.", ["kind", "error"])
QUEUE_DEPTH = Gauge("kubetune_workqueue_depth", "Keys waiting to be reconciled now, by kind.", ["kind"])
QUEUE_RETRIES = Counter("kubetune_workqueue_retries_total", "Reconciles retried after a failure, by kind.", ["kind"])
RUNS_STARTED = Counter("kubetune_runs_started_total", "FineTuneJob runs started, by trigger.", ["trigger"])
RUNS_FINISHED = Counter("kubetune_runs_finished_total", "FineTuneJob runs finished, by outcome.", ["outcome"])
PROMOTIONS = Counter("kubetune_promotions_total", "Runs that passed the promotion gate.")


@functools.cache  # once per process and port, also when the operator restarts in the same process
def serve(port: int, address: str = "0.0.0.0") -> None:
    """Serve /metrics in a background thread."""
    start_http_server(port, addr=address)
