"""Every example validates, and `kubetune validate` reports problems by field."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kubetune.cli.main import build_parser, main
from kubetune.operator.api.manifests import parse

from ..conftest import EXAMPLES, REPO_ROOT

# examples/gitops also holds Argo CD, Flux and Kustomize manifests: test_gitops checks those.
EXAMPLE_FILES = sorted(p for p in EXAMPLES.rglob("*.yaml") if "gitops" not in p.relative_to(EXAMPLES).parts)


def test_there_are_examples_of_each_kind() -> None:
    kinds = {document["kind"] for path in EXAMPLE_FILES for document in yaml.safe_load_all(path.read_text())}
    assert kinds == {"FineTuneJob", "ModelDeployment"}
    assert len(EXAMPLE_FILES) >= 3


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_is_valid(path: Path) -> None:
    for document in yaml.safe_load_all(path.read_text()):
        parse(document)


# The examples for the cluster (examples/*.yaml) and those for `kubetune run`, one folder each, which
# write their outputs to local paths.
CLUSTER_EXAMPLES = sorted(EXAMPLES.glob("*.yaml"))
LOCAL_EXAMPLES = sorted(path for path in EXAMPLE_FILES if path.parent != EXAMPLES)


def test_validate_accepts_the_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", *map(str, CLUSTER_EXAMPLES)]) == 0
    assert "FineTuneJob support-tickets" in capsys.readouterr().out
    assert main(["validate", "--local", *map(str, LOCAL_EXAMPLES)]) == 0


@pytest.mark.parametrize("path", LOCAL_EXAMPLES, ids=lambda p: p.parent.name)
def test_a_local_output_is_refused_for_the_cluster(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(path)]) == 1
    assert "spec.output.uri: output.uri must be s3:// or pvc://" in capsys.readouterr().err


def test_validate_names_the_bad_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    document = yaml.safe_load((EXAMPLES / "finetunejob-minimal.yaml").read_text())
    document["spec"]["hyperparameters"] = {"epochs": 0}
    bad.write_text(yaml.safe_dump(document) + "---\n" + (EXAMPLES / "modeldeployment.yaml").read_text())
    assert main(["validate", str(bad)]) == 1
    captured = capsys.readouterr()
    assert "spec.hyperparameters.epochs" in captured.err
    assert "ModelDeployment support-tickets" in captured.out  # the good document still validates


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("a: [unclosed", "not valid YAML"),
        ("", "no manifests found"),
        ("- just\n- a list\n", "expected a mapping"),
    ],
)
def test_validate_rejects_unusable_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, expected: str
) -> None:
    path = tmp_path / "file.yaml"
    path.write_text(content)
    assert main(["validate", str(path)]) == 1
    assert expected in capsys.readouterr().err


def test_validate_reports_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "absent.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_crds_command_writes_the_committed_files(tmp_path: Path) -> None:
    assert main(["crds", str(tmp_path)]) == 0
    for path in tmp_path.iterdir():
        assert path.read_text() == (REPO_ROOT / "crds" / path.name).read_text()


def test_the_help_names_every_command() -> None:
    parser = build_parser()
    (commands,) = (action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    described = {name for name in commands.choices if f"`{name}`" in (parser.description or "")}
    assert set(commands.choices) - described == {"version"}


def test_console_script_runs() -> None:
    kubetune = Path(sys.executable).parent / "kubetune"
    result = subprocess.run([str(kubetune), "version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "0.1.0"


def test_the_quick_start_example_names_its_data_and_every_label_in_it() -> None:
    job = next(yaml.safe_load_all((EXAMPLES / "text-classification" / "finetunejob.yaml").read_text()))
    train = REPO_ROOT / job["spec"]["data"]["train"]
    records = [json.loads(line) for line in train.read_text().splitlines()]
    assert {record["label"] for record in records} == set(job["spec"]["model"]["labels"])
    assert len({record["text"] for record in records}) == len(records) == 300  # no duplicates
    assert job["spec"]["resources"]["workers"] == 2
