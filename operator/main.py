"""The operator process: `kubetune operator`, or `kopf run -m kubetune.operator.main`.

`operator/core/` is the controller framework: work queues, informers of the objects
kubetune makes, and the controllers that reconcile. kopf's role is the watch of the
two CRDs (its handlers only enqueue keys) and logging in; it always runs standalone.

Startup makes the shared pieces (API client, thread pool, one controller per
kind) and keeps them in kopf's memo, where the handlers find them. With leader
election (`leader.py`), the controllers start once this replica holds the Lease;
until then kopf's handlers enqueue into controllers that have not started (a queue
holds each key once), and those keys are the new leader's first pass.
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
from kubetune.operator.handlers.finetunejob import FineTuneJobs
from kubetune.operator.handlers.modeldeployment import ModelDeployments
from kubetune.operator.kube import Kube
from kubetune.operator.leader import Election, elect, exit_process
from kubetune.operator.model.events import utc_now
from kubetune.operator.settings import Settings

log = logging.getLogger("kubetune.operator")


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
    _client(memo)
    memo.executor = ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="kubetune-reconcile")
    _build(memo)
    if "election" not in memo and options.leader_election:  # `kopf run`: the settings alone decide
        memo.election = Election.of(options)
    election: Election | None = memo.get("election")
    if election is None:
        _start(memo)
        return
    loop = asyncio.get_running_loop()

    def leading() -> None:  # in the election's thread
        log.info("leading: holds Lease %s/%s as %s", election.namespace, election.lease, election.identity)
        try:
            loop.call_soon_threadsafe(_start, memo)
        except RuntimeError:  # the loop has closed: the operator has stopped
            return

    elect(election, memo.kube.configuration, leading, exit_process(election))


def _build(memo: kopf.Memo) -> None:
    """The caches and controllers, not started yet: kopf's handlers may enqueue into them meanwhile."""
    kube, options, executor = memo.kube, memo.settings, memo.executor
    namespaces = memo.get("namespaces") or None
    clock = memo.get("clock") or utc_now
    jobs = FineTuneJobs(kube, options, clock, executor, namespaces)
    deployments = ModelDeployments(kube, options, clock, executor, namespaces)
    controllers = [jobs.controller, deployments.controller]

    def changed(kind: str, namespace: str, name: str) -> None:
        """An object others may depend on changed (a FineTuneJob): every kind hears of it."""
        for controller in controllers:
            controller.dependency_changed(kind, namespace, name)

    memo.finetunejobs, memo.modeldeployments = jobs, deployments
    memo.changed = changed


def _start(memo: kopf.Memo) -> None:
    if memo.get("stopping"):  # the Lease came while the operator shuts down
        return
    memo.finetunejobs.start()
    memo.modeldeployments.start()


async def _stop_controllers(memo: kopf.Memo) -> None:
    for kind in ("finetunejobs", "modeldeployments"):
        if memo.get(kind) is not None:
            await memo[kind].stop()


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
    memo.stopping = True
    await _stop_controllers(memo)
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
    With `settings.leader_election`, the operator reconciles only while it holds the Lease
    (`leader.py`); a SettingsError says what keeps the election from working.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    options = settings or Settings.from_environment()
    election = Election.of(options) if options.leader_election else None  # before anything starts
    memo = kopf.Memo(
        clock=clock, settings=options, namespaces=namespaces, kube=Kube.connect(kubeconfig), election=election
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
