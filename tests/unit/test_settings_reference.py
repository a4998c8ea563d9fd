"""The configuration reference and the chart's settings env are generated, complete and current."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml
from kubetune.operator import settingsgen
from kubetune.operator.settings import OperatorSettings
from kubetune.runtime.io.settings import RuntimeSettings

from ..conftest import REPO_ROOT

DOCS = REPO_ROOT / "docs"
CHART = REPO_ROOT / "charts" / "kubetune"
CODE_FOLDERS = ("operator", "runtime", "cli")
DEVELOPMENT_FOLDERS = ("scripts", "tests")
VARIABLE = re.compile(r"\bKUBETUNE_[A-Z][A-Z0-9_]*[A-Z0-9]\b")
# Shell reads of a variable (${NAME:-...}, ${NAME}); `$KUBETUNE_ROOT` is scripts/env.sh's own shell variable.
SHELL_READ = re.compile(r"\$\{(KUBETUNE_[A-Z0-9_]+)")
ENVIRON_READS = ("get", "getenv", "__getitem__")


def documented() -> set[str]:
    return set(re.findall(r"^\| `(KUBETUNE_[A-Z0-9_]+)`", (DOCS / settingsgen.DOCS_FILE).read_text(), re.MULTILINE))


def test_the_committed_files_are_what_the_generator_writes() -> None:
    assert (DOCS / settingsgen.DOCS_FILE).read_text() == settingsgen.render_docs(), (
        f"regenerate with: {settingsgen.COMMAND}"
    )
    assert (CHART / settingsgen.CHART_FILE).read_text() == settingsgen.render_chart(), (
        f"regenerate with: {settingsgen.COMMAND}"
    )


def test_the_generator_writes_both_files(tmp_path: Path) -> None:
    assert settingsgen.main([str(tmp_path / "docs"), str(tmp_path / "chart")]) == 0
    assert (tmp_path / "docs" / settingsgen.DOCS_FILE).read_text() == settingsgen.render_docs()
    assert (tmp_path / "chart" / settingsgen.CHART_FILE).read_text() == settingsgen.render_chart()
    assert settingsgen.main([str(tmp_path)]) == 2


def test_every_setting_is_documented_with_a_description() -> None:
    names = documented()
    for settings in (OperatorSettings, RuntimeSettings):
        for name, field in settings.model_fields.items():
            assert settingsgen.variable(name) in names
            assert field.description, f"{settings.__name__}.{name} has no description"
    assert {item.name for item in settingsgen.DEVELOPMENT_VARIABLES} <= names
    assert documented().isdisjoint({"KUBETUNE_CACHE_MOUNT_PATH", "KUBETUNE_POD_USER_ID", "KUBETUNE_PVC_MOUNT_ROOT"})


def _python_files(*folders: str) -> list[Path]:
    return [path for folder in folders for path in (REPO_ROOT / folder).rglob("*.py")]


def _shell_files(*folders: str) -> list[Path]:
    """Shell scripts: *.sh, and the scripts without a suffix (scripts/test, scripts/cluster, ...)."""
    candidates = [path for folder in folders for path in (REPO_ROOT / folder).rglob("*") if path.is_file()]
    return [path for path in candidates if path.suffix == ".sh" or (not path.suffix and path.parent.name == "scripts")]


def _environment_reads(path: Path) -> set[str]:
    """KUBETUNE_* names a Python file reads with os.environ.get/[...]/os.getenv."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ENVIRON_READS:
            arguments = node.args[:1]
        elif isinstance(node, ast.Subscript) and "environ" in ast.unparse(node.value):
            arguments = [node.slice]
        else:
            continue
        constants = (arg.value for arg in arguments if isinstance(arg, ast.Constant) and isinstance(arg.value, str))
        names |= {value for value in constants if value.startswith("KUBETUNE_")}
    return names


def test_every_variable_the_code_names_is_in_the_reference() -> None:
    named = {name for path in _python_files(*CODE_FOLDERS) for name in VARIABLE.findall(path.read_text())}
    assert named, "the scan finds nothing: the pattern is wrong"
    assert named - documented() == set()


def test_every_variable_the_scripts_and_tests_read_is_in_the_reference() -> None:
    read = {name for path in _python_files(*DEVELOPMENT_FOLDERS) for name in _environment_reads(path)}
    read |= {name for path in _shell_files(*DEVELOPMENT_FOLDERS) for name in SHELL_READ.findall(path.read_text())}
    assert {"KUBETUNE_TEST_KUBECONFIG", "KUBETUNE_VENV"} <= read, "the scan finds nothing: the pattern is wrong"
    assert read - documented() == set()
    # Test and development knobs say so in their names.
    development = {item.name for item in settingsgen.DEVELOPMENT_VARIABLES}
    assert {name for name in development if not name.startswith(("KUBETUNE_TEST_", "KUBETUNE_DEV_"))} == {
        "KUBETUNE_VENV",
        "KUBETUNE_EXTRAS",
    }


def _values_paths(values: dict[str, object], prefix: str = "") -> set[str]:
    """Dotted paths of the values under `operator:`; a map of labels (string values) is one value."""
    paths = set()
    for key, value in values.items():
        if isinstance(value, dict) and any(not isinstance(item, str) for item in value.values()):
            paths |= _values_paths(value, f"{prefix}{key}.")
        else:
            paths.add(f"{prefix}{key}")
    return paths


def test_every_operator_value_of_the_chart_is_a_setting_and_back() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())["operator"]
    wired = {key for _, key, _ in settingsgen.chart_settings()}
    assert _values_paths(values) == wired


@pytest.mark.parametrize(("name", "key"), [(name, key) for name, key, _ in settingsgen.chart_settings()])
def test_the_chart_passes_each_setting_by_its_variable(name: str, key: str) -> None:
    path = " ".join(f'"{part}"' for part in key.split("."))
    assert f"{{{{- $value := dig {path} nil $settings }}}}\n{{{{- if or" in settingsgen.render_chart()
    assert f"- name: {name}\n" in settingsgen.render_chart()


def test_the_deployment_includes_the_generated_env() -> None:
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    assert f'include "{settingsgen.TEMPLATE_NAME}" $settings' in deployment
    # The settings the chart derives from other values: metrics.enabled and metrics.port, and the leader
    # election's from leaderElection.* and the release's name and namespace.
    derived = {
        "KUBETUNE_METRICS_PORT",
        "KUBETUNE_LEADER_ELECTION",
        "KUBETUNE_LEADER_ELECTION_LEASE",
        "KUBETUNE_LEADER_ELECTION_NAMESPACE",
        "KUBETUNE_LEASE_DURATION_SECONDS",
        "KUBETUNE_LEASE_RENEW_DEADLINE_SECONDS",
        "KUBETUNE_LEASE_RETRY_PERIOD_SECONDS",
    }
    assert set(VARIABLE.findall(deployment)) == derived
