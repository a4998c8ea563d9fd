"""The operator process: `kubetune operator`, or `kopf run -m kubetune.operator.main`.

Startup makes the shared pieces (API client, Secret watch, thread pool, one
controller per kind) and keeps them in kopf's memo, where the handlers find them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import kopf
from kubetune.operator import metrics
from kubetune.operator.core.informer import Informer, Source
from kubetune.operator.handlers.finetunejob import FineTuneJobs
from kubetune.operator.handlers.modeldeployment import ModelDeployments
from kubetune.operator.kube import Kube
from kubetune.operator.reconcile.finetunejob import utc_now
from kubetune.operator.settings import Settings

log = logging.getLogger("kubetune.operator")
# Which Secrets exist, read as metadata only: the specs name them, the operator never reads their data.
SECRETS = Source("v1", "Secret", metadata_only=True)


class NoDiffBase(kopf.DiffBaseStorage):
    """kubetune registers no create/update handlers, so kopf needs no copy of each object's essence.

    (kopf builds one for every event by default: a deep copy of the whole body.)
    """

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # kubetune posts its own events (with run details) and keeps no kopf state on objects.
    settings.posting.enabled = False
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # kopf would log every handler call; the reconciles log what they do.
    if logging.getLogger("kopf.objects").level == logging.NOTSET:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    options: Settings = memo.get("settings") or Settings.from_environment()
    memo.settings = options
    if options.metrics_port:
        metrics.serve(options.metrics_port)
    kube = _client(memo)
    namespaces = memo.get("namespaces") or None
    executor = ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="kubetune-reconcile")
    secrets: Informer[bool] = Informer(kube, SECRETS, namespaces, lambda _: True)
    clock = memo.get("clock") or utc_now
    jobs = FineTuneJobs(kube, options, secrets, clock, executor, namespaces)
    deployments = ModelDeployments(kube, options, secrets, clock, executor, namespaces)
    controllers = [jobs.controller, deployments.controller]

    def changed(kind: str, namespace: str, name: str) -> None:
        """An object others may depend on changed (a Secret, a FineTuneJob): every kind hears of it."""
        for controller in controllers:
            controller.dependency_changed(kind, namespace, name)

    memo.executor, memo.secrets, memo.finetunejobs, memo.modeldeployments = executor, secrets, jobs, deployments
    memo.changed = changed
    secrets.start(lambda change: changed("Secret", change.namespace, change.name))
    jobs.start()
    deployments.start()


def _client(memo: kopf.Memo) -> Kube:
    """The operator's client, made once per process run; kopf's login reuses its configuration."""
    if memo.get("kube") is None:
        memo.kube = Kube.connect()
    kube: Kube = memo.kube
    return kube


@kopf.on.login()
def login(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
    # The same credentials as the operator's own client; kopf calls this again when they are rejected.
    # (kopf logs in before the startup handlers run.)
    kube = _client(memo)
    config = kube.configuration
    header = kube.authorization()
    scheme, _space, token = (header or "").partition(" ")
    return kopf.ConnectionInfo(
        server=kube.server,
        ca_path=config.ssl_ca_cert,
        insecure=not config.verify_ssl,
        scheme=scheme or None,
        token=token or None,
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
        trust_env=settings.networking.trust_env,
    )


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    for kind in ("finetunejobs", "modeldeployments"):
        if memo.get(kind) is not None:
            await memo[kind].stop()
    if memo.get("secrets") is not None:
        await asyncio.to_thread(memo.secrets.stop)
    if memo.get("executor") is not None:
        memo.executor.shutdown(wait=True, cancel_futures=True)


def run(
    namespaces: list[str],
    settings: Settings | None = None,
    *,
    stop: threading.Event | None = None,
    ready: threading.Event | None = None,
    clock: Callable[[], datetime] = utc_now,
    kubeconfig: str | None = None,
    liveness: str | None = None,
) -> None:
    """Run the operator until stopped (blocking). No namespaces means all namespaces.

    `settings` default to the environment's; `clock` is what schedules are read
    against (tests pass a clock they can move); `kubeconfig` overrides the usual lookup;
    `liveness` is where kopf serves its health endpoint (e.g. http://0.0.0.0:8081/healthz).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    memo = kopf.Memo(
        clock=clock,
        settings=settings or Settings.from_environment(),
        namespaces=namespaces,
        kube=Kube.connect(kubeconfig),
    )
    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=not namespaces,
            namespaces=namespaces,
            stop_flag=stop,
            ready_flag=ready,
            memo=memo,
            liveness_endpoint=liveness,
        )
    )
