"""`auto` hyperparameters: resolved by the run before it trains, recorded with why, and as good as fixed values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.cli.run import EXIT_OK
from kubetune.runtime.contract.report import RunReport
from kubetune.runtime.reporting.base import read_events

pytestmark = pytest.mark.runtime

ROOT = Path(__file__).resolve().parents[2]
KUBETUNE = Path(sys.executable).with_name("kubetune")
EXAMPLE = ROOT / "examples" / "text-classification" / "finetunejob.yaml"
AUTO = {
    "batchSize": "auto",
    "effectiveBatchSize": 16,
    "maxSequenceLength": "auto",
    "precision": "auto",
    "gradientCheckpointing": "auto",
}
# The example as written (batchSize 8, maxSequenceLength 64, fp32, no checkpointing), same seed, one
# worker: test accuracy 56/60, measured with this code beside the auto run below (which matched it).
# Measured once rather than in every run: the fixed run would double this test's minutes.
EXAMPLE_ACCURACY = 56 / 60
DECIDED = {
    f"spec.hyperparameters.{name}" for name in (*AUTO.keys() - {"effectiveBatchSize"}, "gradientAccumulationSteps")
}


def _seeded_hub_cache(folder: Path) -> None:
    """MiniLM in a Hugging Face cache, as the example names it (hf://), from the package that ships it."""
    subprocess.run([sys.executable, ROOT / "scripts" / "seed_hf_cache.py", folder], check=True, timeout=120)


def _run(job_file: Path, output: Path, env: dict[str, str]) -> tuple[str, dict[str, Any], RunReport]:
    command = [str(KUBETUNE), "run", str(job_file), "--no-serve", "--output", str(output), "--workers", "1"]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == EXIT_OK, run
    manifest = json.loads((output / "kubetune.json").read_text())
    events = read_events(output / "events.jsonl")
    return run.stdout, manifest, RunReport.model_validate(events[-1]["result"])


def test_auto_values_are_resolved_recorded_and_train_as_well_as_the_examples_values(tmp_path: Path) -> None:
    """The text-classification example with every auto value: the run records each decision (report, manifest,
    console), trains with concrete values, and tests at least as accurate as the example's values (same seed)."""
    _seeded_hub_cache(tmp_path / "hf" / "hub")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    documents = list(yaml.safe_load_all(EXAMPLE.read_text()))
    documents[0]["spec"]["hyperparameters"] = {
        key: value for key, value in documents[0]["spec"]["hyperparameters"].items() if key not in AUTO
    } | AUTO
    auto_file = tmp_path / "auto.yaml"
    auto_file.write_text(yaml.safe_dump_all(documents))

    out, manifest, result = _run(auto_file, tmp_path / "auto", env)

    decisions = {decision.field: decision for decision in result.decisions or []}
    assert set(decisions) == DECIDED, decisions
    # On CPUs: fp32, no checkpointing, the effective batch in one step (memory is plenty for 16 short texts).
    values = {field.rpartition(".")[2]: decision.value for field, decision in decisions.items()}
    assert values["precision"] == "fp32" and values["gradientCheckpointing"] is False
    batch, steps = values["batchSize"], values["gradientAccumulationSteps"]
    assert isinstance(batch, int) and isinstance(steps, int) and batch * steps >= 16
    assert isinstance(values["maxSequenceLength"], int) and 8 <= values["maxSequenceLength"] <= 512
    assert "p95 of" in decisions["spec.hyperparameters.maxSequenceLength"].reason

    # The manifest: the decisions, the concrete values trained with, and the spec as written.
    assert [d["field"] for d in manifest["decisions"]] == [d.field for d in result.decisions or []]
    trained = manifest["hyperparameters"]
    assert {key: trained[key] for key in values} == values
    assert "effectiveBatchSize" not in trained
    assert manifest["lineage"]["spec"]["hyperparameters"]["batchSize"] == "auto"

    # The console: a table of the auto values with why.
    assert "auto values" in out, out
    rows = [line for line in out.splitlines() if "spec.hyperparameters." in line]
    assert any("maxSequenceLength" in row and str(values["maxSequenceLength"]) in row for row in rows), out

    accuracy = (result.metrics_after or {})["accuracy"]
    print(f"test accuracy: auto values {accuracy}, the example's values {EXAMPLE_ACCURACY:.4f}")
    assert accuracy is not None and accuracy >= EXAMPLE_ACCURACY - 1e-9, accuracy
