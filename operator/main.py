"""The operator process: `kubetune operator`, or `kopf run -m kubetune.operator.main`.

Startup makes the shared pieces (API client, thread pool, one controller per
kind) and keeps them in kopf's memo, where the handlers find them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf
from kopf._core.engines.peering import Identity  # the type of kopf.operator's `identity` (not re-exported)
from kubetune.operator import metrics
from kubetune.operator.api.common import GROUP, VERSION
from kubetune.operator.handlers.finetunejob import FineTuneJobs
from kubetune.operator.handlers.modeldeployment import ModelDeployments
from kubetune.operator.kube import ApiError, Kube
from kubetune.operator.model.events import utc_now
from kubetune.operator.settings import Settings

log = logging.getLogger("kubetune.operator")
JOB_KIND = (f"{GROUP}/{VERSION}", "FineTuneJob")
DEPLOYMENT_KIND = (f"{GROUP}/{VERSION}", "ModelDeployment")
# How often a peered operator reads the peering object: the delay it adds to a takeover.
PEERING_POLL_SECONDS = 1.0


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
    gate: PeeringGate | None = memo.get("peering")
    if gate is None:
        _start(memo)
        return
    # A peer that stops touching its record is taken for dead after its lifetime: kopf's 60 s
    # default would leave the jobs unattended for a minute after a pod is lost.
    settings.peering.lifetime = gate.lifetime
    memo.follower = asyncio.create_task(_follow(memo, gate), name="kubetune-peering")


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
    memo.finetunejobs.start()
    memo.modeldeployments.start()


async def _stop_controllers(memo: kopf.Memo) -> None:
    for kind in ("finetunejobs", "modeldeployments"):
        if memo.get(kind) is not None:
            await memo[kind].stop()


@dataclass(frozen=True)
class PeeringGate:
    """This operator's place among its peers: it reconciles only while no live peer outranks it.

    kopf pauses its own watches the same way, but the controllers also act on their
    caches' events and on timers, so they are started and stopped by this gate too.
    """

    name: str
    identity: str
    priority: int
    namespaces: tuple[str, ...]  # empty: the ClusterKopfPeering
    lifetime: int = 10

    def blockers(self, kube: Kube, now: datetime) -> list[str] | None:
        """The live peers of higher or equal priority (kopf pauses for equal ones too); None: no peering object."""
        scopes = list(self.namespaces) or [""]
        kind = "KopfPeering" if self.namespaces else "ClusterKopfPeering"
        blockers: list[str] = []
        for namespace in scopes:
            peering = kube.get("kopf.dev/v1", kind, namespace, self.name)
            if peering is None:
                return None
            for identity, peer in (peering.get("status") or {}).items():
                if identity == self.identity or not isinstance(peer, dict):
                    continue
                seen = datetime.fromisoformat(str(peer.get("lastseen") or now.isoformat()))
                alive = seen + timedelta(seconds=int(peer.get("lifetime", 60))) > now
                if alive and int(peer.get("priority", 0)) >= self.priority:
                    blockers.append(identity)
        return blockers


async def _follow(memo: kopf.Memo, gate: PeeringGate) -> None:
    """Start the controllers when this operator becomes the active one, stop them when it is not."""
    active, sweep, reason = False, False, ""
    while True:
        try:
            blockers = await asyncio.to_thread(gate.blockers, memo.kube, datetime.now(UTC))
        except (ApiError, ValueError, TypeError) as error:  # unreachable, or a record not as kopf writes it
            blockers = [] if active else ["(peering unreadable)"]  # keep the current state meanwhile
            log.warning("could not read peering %s: %s", gate.name, error)
        if blockers == [] and not active:
            log.info("active in peering %s (identity %s, priority %d)", gate.name, gate.identity, gate.priority)
            _start(memo)
            active, sweep, reason = True, True, ""
        elif blockers != []:
            why = "no peering object" if blockers is None else f"paused in favour of {', '.join(blockers)}"
            if why != reason:
                log.info("standby in peering %s (priority %d): %s", gate.name, gate.priority, why)
            reason = why
            if active:
                await _stop_controllers(memo)
                _build(memo)
            active = sweep = False
        if sweep:
            try:
                await asyncio.to_thread(_enqueue_all, memo)
                sweep = False
            except ApiError as error:  # retried on the next round
                log.warning("could not list the objects to look at after taking over: %s", error)
        await asyncio.sleep(PEERING_POLL_SECONDS)


def _enqueue_all(memo: kopf.Memo) -> None:
    """On taking over, every object gets a pass: the previous active operator's timers died with it."""
    for (api_version, kind), controller in (
        (JOB_KIND, memo.finetunejobs.controller),
        (DEPLOYMENT_KIND, memo.modeldeployments.controller),
    ):
        for namespace in memo.get("namespaces") or [None]:
            items, _ = memo.kube.list_with_version(api_version, kind, namespace, metadata_only=True)
            for item in items:
                meta = item["metadata"]
                controller.enqueue((meta.get("namespace") or "", meta["name"]))


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
    if memo.get("follower") is not None:
        memo.follower.cancel()
        await asyncio.gather(memo.follower, return_exceptions=True)
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
    peering: str | None = None,
    priority: int | None = None,
    peering_lifetime: int = 10,
) -> None:
    """Run the operator until stopped (blocking). No namespaces means all namespaces.

    `settings` default to the environment's; `clock` is what schedules are read
    against (tests pass a clock they can move); `kubeconfig` overrides the usual lookup;
    `liveness` is where kopf serves its health endpoint (e.g. http://0.0.0.0:8081/healthz).
    `peering` names the kopf peering object (KopfPeering in each watched namespace, or
    ClusterKopfPeering when all are watched): of the operators in it, only the one of the
    highest priority works; the others stand by and take over within `peering_lifetime`
    seconds of its death. Without it the operator runs standalone.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    memo = kopf.Memo(
        clock=clock,
        settings=settings or Settings.from_environment(),
        namespaces=namespaces,
        kube=Kube.connect(kubeconfig),
    )
    identity = None
    if peering is not None:
        # kopf pauses every operator of a priority tie, so replicas that share their flags
        # draw distinct priorities; the one that drew the highest is active.
        priority = priority if priority is not None else random.randint(1, 2**31 - 1)
        identity = os.environ.get("POD_ID") or f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:6]}"
        memo.peering = PeeringGate(peering, identity, priority, tuple(namespaces), peering_lifetime)
    asyncio.run(
        kopf.operator(
            standalone=peering is None,
            peering_name=peering,
            priority=priority,
            identity=Identity(identity) if identity is not None else None,
            clusterwide=not namespaces,
            namespaces=namespaces,
            stop_flag=stop,
            ready_flag=ready,
            memo=memo,
            liveness_endpoint=liveness,
        )
    )
