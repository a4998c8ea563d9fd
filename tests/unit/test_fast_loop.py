"""`scripts/test --fast`, the developer's loop: ruff and the unit tier, without the Go builds and mypy of the
full command, which stays what CI runs.

The script runs on a copy whose environment and tools are stand-ins that record how they are called.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

from ..conftest import REPO_ROOT

STAND_IN_ENV = """set -euo pipefail
KUBETUNE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$KUBETUNE_ROOT/venv"
kubetune_setup() { echo setup >>"$KUBETUNE_ROOT/calls"; }
"""
STAND_IN_TOOL = '#!/bin/sh\necho "$(basename "$0") $*" >>"$(dirname "$0")/../../calls"\n'


def executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def run_script(checkout: Path, *args: str) -> list[str]:
    """scripts/test with `args` on a stand-in checkout: the commands it ran, in order."""
    shutil.copy(REPO_ROOT / "scripts" / "test", checkout / "scripts" / "test")
    (checkout / "calls").write_text("")
    environment = {k: v for k, v in os.environ.items() if k not in ("KUBETUNE_TEST_KUBECONFIG", "KUBEBUILDER_ASSETS")}
    environment["PATH"] = f"{checkout / 'venv' / 'bin'}:{environment['PATH']}"  # `go` as well
    subprocess.run([str(checkout / "scripts" / "test"), *args], cwd=checkout, env=environment, check=True, timeout=60)
    return (checkout / "calls").read_text().splitlines()


def stand_in_checkout(root: Path) -> Path:
    (root / "scripts").mkdir()
    (root / "scripts" / "env.sh").write_text(STAND_IN_ENV)
    # lint-imports: the import contracts run after mypy in the full command.
    for tool in ("ruff", "mypy", "lint-imports", "pytest", "python", "go"):
        executable(root / "venv" / "bin" / tool, STAND_IN_TOOL)
    executable(root / "tests" / "controlplane" / "build.sh", STAND_IN_TOOL)
    return root


def test_fast_runs_ruff_and_the_unit_tier_only(tmp_path: Path) -> None:
    calls = run_script(stand_in_checkout(tmp_path), "--fast")
    assert calls == ["setup", "ruff check .", "ruff format --check .", "pytest tests/unit"]


def test_fast_passes_its_arguments_to_pytest(tmp_path: Path) -> None:
    calls = run_script(stand_in_checkout(tmp_path), "--fast", "tests/unit/test_crds.py", "-k", "drift")
    assert calls[-1] == "pytest tests/unit/test_crds.py -k drift"
    assert not [call for call in calls if call.startswith(("mypy", "build.sh"))]


def test_the_full_command_still_builds_and_type_checks(tmp_path: Path) -> None:
    calls = run_script(stand_in_checkout(tmp_path), "-k", "crds")
    assert "build.sh --kstatus" in calls
    assert "mypy -p kubetune.operator -p kubetune.runtime -p kubetune.cli" in calls
    assert calls[-1] == "pytest --durations=25 -k crds"
