"""The operator process: `kubetune operator`, or `kopf run -m kubetune.operator.main`."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import kopf
from kubetune.operator import metrics
from kubetune.operator.handlers import finetunejob as finetunejob_handlers
from kubetune.operator.kube import Kube
from kubetune.operator.kubeconfig import connect
from kubetune.operator.reconcile.finetunejob import FineTuneJobReconciler, utc_now
from kubetune.operator.requeue import Requeuer
from kubetune.operator.settings import Settings

WORKERS = int(os.environ.get("KUBETUNE_WORKERS", "16"))
_executor = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="kubetune-reconcile")
_clock: Callable[[], datetime] = utc_now
# `kubetune operator --metrics-port` sets this; under `kopf run -m kubetune.operator.main`,
# KUBETUNE_METRICS_PORT does.
_metrics_port: int | None = None
# The operator's client, made at startup; kopf's login reuses its (renewed) credentials.
_kube: Kube | None = None


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # kubetune posts its own events (with run details) and keeps no kopf state on objects.
    settings.posting.enabled = False
    settings.execution.max_workers = WORKERS
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    global _kube
    port = _metrics_port if _metrics_port is not None else int(os.environ.get("KUBETUNE_METRICS_PORT", "0"))
    if port:
        metrics.serve(port)
    _kube = Kube.connect()
    reconciler = FineTuneJobReconciler(_kube, Settings.from_environment(), clock=_clock)
    finetunejob_handlers.install(
        finetunejob_handlers.FineTuneJobController(reconciler, lambda callback: Requeuer(callback, _executor))
    )


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    # The same credentials as the operator's own client; kopf re-runs this when they expire.
    # (kopf runs startup handlers before it logs in, so the client normally exists.)
    connection = _kube.connection if _kube is not None else connect()
    token = connection.bearer_token()
    return kopf.ConnectionInfo(
        server=connection.server,
        ca_path=connection.ca_file,
        insecure=connection.insecure,
        scheme="Bearer" if token else None,
        token=token,
        username=connection.username,
        password=connection.password,
        certificate_path=connection.cert_file,
        private_key_path=connection.key_file,
        default_namespace=connection.namespace,
        expiration=connection.expires,
    )


@kopf.on.cleanup()
def shutdown(**_: Any) -> None:
    controller = finetunejob_handlers._controller
    if controller is not None:
        controller.requeuer.stop()


def run(
    namespaces: list[str],
    metrics_port: int | None,
    stop: threading.Event | None = None,
    ready: threading.Event | None = None,
    clock: Callable[[], datetime] = utc_now,
) -> None:
    """Run the operator until stopped (blocking). No namespaces means all namespaces.

    `clock` is what schedules are read against (tests pass a clock they can move).
    """
    global _clock, _metrics_port
    _clock, _metrics_port = clock, metrics_port or 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(
        kopf.operator(
            standalone=True, clusterwide=not namespaces, namespaces=namespaces, stop_flag=stop, ready_flag=ready
        )
    )
