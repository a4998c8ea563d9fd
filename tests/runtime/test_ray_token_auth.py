"""Ray's token authentication, as KubeRay turns it on (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN), leaves
Serve's HTTP port open: an endpoint's clients need no Ray token, while the dashboard (job submission,
Serve's REST API) refuses requests without one.

A Ray of its own, in a child process (the tier's shared Ray runs without authentication), with Serve
as an endpoint's pods run it (HAProxy on the HTTP port); the child stops its Ray before it exits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from kubetune.runtime.contract.serving import SERVE_ENVIRONMENT

from ..integration.test_operator_restarts import free_port

pytestmark = pytest.mark.runtime

TOKEN = "k" * 32
CHILD = textwrap.dedent(
    """
    import json, sys, urllib.error, urllib.request
    import ray
    from ray import serve

    dashboard, http = int(sys.argv[1]), int(sys.argv[2])

    def status(port, path, headers=None):
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=60) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    ray.init(num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http})

        @serve.deployment(ray_actor_options={"num_cpus": 0.1})
        def hello(request):
            return "hello"

        serve.run(hello.bind(), route_prefix="/hello")
        token = {"x-ray-authorization": "Bearer " + sys.argv[3]}
        found = {
            "serve": status(http, "/hello"),
            "jobs": status(dashboard, "/api/jobs/"),
            "jobs with the token": status(dashboard, "/api/jobs/", token)[0],
            "serve applications": status(dashboard, "/api/serve/applications/")[0],
        }
        serve.shutdown()
    finally:
        ray.shutdown()
    print("RESULT " + json.dumps(found))
    """
)


def test_serves_http_port_answers_without_a_ray_token_in_token_mode() -> None:
    env = {**os.environ, **SERVE_ENVIRONMENT, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(free_port()), str(free_port()), TOKEN],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = child.communicate(timeout=420)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    results = [line.removeprefix("RESULT ") for line in output.splitlines() if line.startswith("RESULT ")]
    assert child.returncode == 0 and results, output[-4000:]
    found = json.loads(results[-1])
    assert found["serve"] == [200, "hello"]  # no Ray token asked of an endpoint's clients
    status, message = found["jobs"]
    assert status == 401 and "authentication token" in message  # token mode is on: the dashboard asks
    assert found["jobs with the token"] == 200 and found["serve applications"] == 401
