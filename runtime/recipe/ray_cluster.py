"""Connect to the Ray cluster of a RayJob, or start a local one for a run on this machine."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import ray

# Ray's token authentication stays on for a local Ray: anything that reaches one of its ports
# could otherwise run code here, and Ray 2.60 listens on the machine's network addresses
# whatever it is told (its gRPC servers on all of them; the dashboard agent, on the node's
# address, to which Ray resolves even an `_node_ip_address` of 127.0.0.1). The token is
# random, made per process, and kept only in the environment, which Ray's processes
# inherit; Ray writes no token file then.
AUTH_TOKEN_VARIABLE = "RAY_AUTH_TOKEN"
TOKEN_BYTES = 32
# Where a local Ray's dashboard, when it has one, serves Ray's HTTP APIs (behind the token).
DASHBOARD_HOST = "127.0.0.1"


def local_authentication() -> None:
    """Turn Ray's token authentication on for a Ray started from this process (an existing token is kept)."""
    from ray._private.authentication.authentication_token_setup import _enable_token_auth
    from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]  # not in its stub

    if not os.environ.get(AUTH_TOKEN_VARIABLE):
        os.environ[AUTH_TOKEN_VARIABLE] = secrets.token_urlsafe(TOKEN_BYTES)
    # What ray.init does when it turns token auth on itself: set RAY_AUTH_MODE=token and re-read
    # Ray's configuration in this process (read once, when ray is imported); then the token.
    _enable_token_auth()
    AuthenticationTokenLoader.instance().reset_cache()


@contextmanager
def ray_cluster(num_cpus: int | None = None, *, state_api: bool = False) -> Iterator[None]:
    """Use an initialised Ray as is; join RAY_ADDRESS (inside a RayJob); else start Ray here and stop it after.

    `state_api`: a Ray started here runs its dashboard, which serves Ray's state API; training
    needs it. Ray Train 2.60 starts a PlacementGroupCleaner actor with every training, which asks
    the state API each second whether the training's controller is alive. A Ray without its
    dashboard runs no HTTP server yet still publishes the dashboard's address, so every question
    fails and the cleaner logs a warning for it. Ray has no switch to leave the cleaner out, nor
    a state API without the rest of the dashboard; serving, which has no cleaner, goes without.
    """
    if ray.is_initialized():
        yield
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
    else:
        local_authentication()
        ray.init(
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=state_api,
            dashboard_host=DASHBOARD_HOST,
            logging_level=logging.WARNING,
        )
    try:
        yield
    finally:
        ray.shutdown()
