"""The environment kubetune gives Ray Serve (SERVE_ENVIRONMENT) names settings that the pinned Ray reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

from kubetune.runtime.contract.serving import HAPROXY_CLIENT_TIMEOUT_S, SERVE_ENVIRONMENT

# Ray Serve reads its settings from the environment when this module is imported.
SERVE_CONSTANTS = "ray.serve._private.constants"


def test_every_name_is_a_setting_of_ray_serve() -> None:
    spec = find_spec(SERVE_CONSTANTS)
    assert spec is not None and spec.origin is not None
    source = Path(spec.origin).read_text(encoding="utf-8")
    unknown = [name for name in SERVE_ENVIRONMENT if f'"{name}"' not in source]
    assert unknown == [], f"not read by {SERVE_CONSTANTS}: {unknown}"


def test_the_client_timeout_reaches_haproxys_config() -> None:
    """As Ray's processes read it: a fresh interpreter with the serving environment."""
    show = (
        "import json; from ray.serve._private.haproxy import HAProxyConfig;"
        "print(json.dumps(HAProxyConfig().timeout_client_s))"
    )
    result = subprocess.run(
        [sys.executable, "-c", show], env={**os.environ, **SERVE_ENVIRONMENT},
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert json.loads(result.stdout.strip().splitlines()[-1]) == HAPROXY_CLIENT_TIMEOUT_S == 60
