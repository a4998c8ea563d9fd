"""A Ray that `kubetune run` starts for training serves the state API Ray Train's cleaner asks.

Ray Train 2.60 starts a PlacementGroupCleaner with every training; it asks Ray's state API each
second whether the training's controller actor is alive, and logs "Failed to query Ray Train
Controller actor state" for each question a Ray without its dashboard cannot answer. The Ray
here is started by `ray_cluster` as a run starts it (in a child process, token authentication
on), and asked what the cleaner asks, at its own address: another Ray on the machine (the tier's)
changes nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.runtime

CHILD = textwrap.dedent(
    """
    import ray
    from ray.util.state import get_actor
    from kubetune.runtime.recipe.ray_cluster import ray_cluster

    with ray_cluster(1, state_api=True):
        controller = ray.remote(num_cpus=0)(type("Controller", (), {"ping": lambda self: 1})).remote()
        ray.get(controller.ping.remote())
        address = ray.get_runtime_context().gcs_address
        # The cleaner's question (ray.train.v2._internal.state.util.is_actor_alive), asked of this Ray.
        print("STATE", get_actor(controller._actor_id.hex(), address=address, timeout=10).state)
    """
)


def test_a_ray_started_for_training_answers_the_placement_group_cleaner() -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS"}}
    child = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300
    )  # fmt: skip
    output = child.stdout + child.stderr
    assert child.returncode == 0, output
    assert "STATE ALIVE" in child.stdout, output
