"""What kstatus (sigs.k8s.io/cli-utils), the status library Flux's health checks use, makes of the statuses
the operator computes: Current once Ready=True for the observed generation, InProgress before.

kstatus knows Ready, Reconciling and Stalled, not Progressing or Degraded: a Degraded object whose
Ready is still True reads as Current, and a failed one (Ready=False, no Stalled) as InProgress, so a
Flux health check waits for it until its timeout instead of failing at once.

The program comes from `tests/controlplane/build.sh --kstatus` (built once from its pinned Go module, cached).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .test_gitops import FINETUNEJOBS, MODELDEPLOYMENTS

BUILD_SCRIPT = Path(__file__).resolve().parents[1] / "controlplane" / "build.sh"


@pytest.fixture(scope="module")
def kstatus() -> Path:
    """The kstatus program, built (minutes the first time, instant once cached) or skipped without Go."""
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--kstatus"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        if shutil.which("go") is None:
            pytest.skip("kstatus is not built and there is no Go toolchain (go on PATH) to build it")
        pytest.fail(f"{BUILD_SCRIPT} --kstatus exited {proc.returncode}\n{proc.stderr}")
    return Path(proc.stdout.splitlines()[-1]) / "bin" / "kstatus"


def compute(program: Path, obj: dict[str, Any]) -> tuple[str, str]:
    proc = subprocess.run([str(program)], input=json.dumps(obj), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    return str(result["status"]), str(result["message"])


READY = ("Current", "Resource is Ready")


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("promoted", READY),
        ("running", ("InProgress", "no run has finished yet")),
        ("pending", ("InProgress", "no run has finished yet")),
        ("no run yet", ("InProgress", "no run has finished yet")),
        ("older generation", ("InProgress", "FineTuneJob generation is 3, but latest observed generation is 2")),
        # A promoted model stays Ready while the next run trains, or after it failed: kstatus reads only Ready.
        ("retraining", READY),
        ("failed after promoted", READY),
        ("suspended", READY),
        # Not Ready and never will be without a change: kstatus has no Stalled condition to read.
        ("gate not passed", ("InProgress", "accuracy improved by 0.001, less than promotion.minImprovement 0.01")),
        ("failed", ("InProgress", "RuntimeError: CUDA out of memory")),
        ("invalid spec", ("InProgress", "spec.output.uri: a run in a cluster writes to s3:// or pvc://")),
        ("suspended, no run", ("InProgress", "no run has finished yet")),
    ],
)
def test_finetunejob(kstatus: Path, case: str, expected: tuple[str, str]) -> None:
    assert compute(kstatus, FINETUNEJOBS[case]) == expected


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("serving", READY),
        ("rolling out", ("InProgress", "rolling out s3://out/runs/2/merged")),
        ("nothing to serve yet", ("InProgress", "nothing to serve yet")),
        ("older generation", ("InProgress", "ModelDeployment generation is 3, but latest observed generation is 2")),
        # The previous model serves again: Ready, though Degraded says the newest one failed.
        ("rolled back", READY),
        ("rollout failed", ("InProgress", "the application is DEPLOY_FAILED: out of memory")),
        ("application unhealthy", ("InProgress", "the application is UNHEALTHY")),
        ("invalid spec", ("InProgress", "spec.output.uri: a run in a cluster writes to s3:// or pvc://")),
    ],
)
def test_modeldeployment(kstatus: Path, case: str, expected: tuple[str, str]) -> None:
    assert compute(kstatus, MODELDEPLOYMENTS[case]) == expected
