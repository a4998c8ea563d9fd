"""What `kubetune run` takes from a manifest file: the job, its deployment, the gate, the serving arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.cli.run import judged, read_local_run, run_spec, serve_args
from kubetune.cli.serve import Endpoint, example_request, local_compile, sample_of, shown_answer
from kubetune.runtime.contract import Sharding, Task
from kubetune.runtime.contract.errors import SpecError
from kubetune.runtime.contract.report import RunReport, Stage, VariantReport
from kubetune.runtime.contract.serving import Variant

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "text-classification" / "finetunejob.yaml"


def _documents() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(EXAMPLE.read_text(encoding="utf-8")))


def _write(tmp_path: Path, documents: list[dict[str, Any]]) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump_all(documents), encoding="utf-8")
    return path


def test_the_example_gives_its_job_and_the_deployment_that_follows_it() -> None:
    local = read_local_run(EXAMPLE)
    assert local.name == "support-tickets"
    assert local.deployment is not None and local.deployment.metadata["name"] == "support-tickets"
    assert local.notes == []


def test_every_problem_of_every_document_is_named_with_its_file(tmp_path: Path) -> None:
    job, deployment = _documents()
    job["spec"]["hyperparameters"]["epochs"] = 0
    job["spec"]["method"]["type"] = "full"  # lora options left behind: a cross-field rule
    deployment["spec"]["autoscaling"]["minReplicas"] = 9
    path = _write(tmp_path, [job, deployment])
    with pytest.raises(SpecError) as raised:
        read_local_run(path)
    problems = raised.value.problems
    assert any(p.startswith(f"{path}#1: spec.hyperparameters.epochs") for p in problems)
    assert any(p.startswith(f"{path}#1: spec.method.lora") for p in problems)
    assert any(p.startswith(f"{path}#2: spec.autoscaling.minReplicas") for p in problems)


@pytest.mark.parametrize("jobs", [0, 2])
def test_a_local_run_needs_exactly_one_job(tmp_path: Path, jobs: int) -> None:
    job, deployment = _documents()
    second = {**job, "metadata": {"name": "another"}}
    path = _write(tmp_path, [*[job, second][:jobs], deployment])
    with pytest.raises(SpecError, match=f"exactly one FineTuneJob, found {jobs}"):
        read_local_run(path)


def test_a_deployment_of_another_job_and_cluster_only_settings_are_noted(tmp_path: Path) -> None:
    job, deployment = _documents()
    job["spec"]["schedule"] = "0 3 * * 0"
    job["spec"]["storage"] = {"huggingFace": {"offline": True}}
    deployment["spec"]["model"]["fromFineTuneJob"]["name"] = "someone-else"
    local = read_local_run(_write(tmp_path, [job, deployment]))
    assert local.deployment is None
    assert local.notes == [
        "ModelDeployment support-tickets does not follow this job: not used here",
        "spec.schedule: a local run runs once",
        "spec.storage.huggingFace: a local run uses this machine's HF_ENDPOINT and HF_HUB_OFFLINE",
    ]


def test_the_run_spec_leaves_cluster_fields_out_and_moves_the_output() -> None:
    local = read_local_run(EXAMPLE)
    spec = run_spec(local.job, "/tmp/elsewhere")
    assert spec.output.uri == "/tmp/elsewhere"
    assert not hasattr(spec, "resources") and not hasattr(spec, "promotion")
    assert run_spec(local.job, None).output.uri == "kubetune-output/text-classification"


def test_serving_arguments_come_from_the_deployment_when_there_is_one(tmp_path: Path) -> None:
    job, deployment = _documents()
    deployment["spec"].update(
        {"maxNewTokens": 7, "compile": True, "routePrefix": "/tickets", "batching": {"maxBatchSize": 4}}
    )
    deployment["spec"]["model"]["fromFineTuneJob"]["variant"] = "merged"
    args, route = serve_args(read_local_run(_write(tmp_path, [job, deployment])), "/out")
    assert (args.model_uri, args.variant, args.model_name, route) == (
        "/out",
        Variant.MERGED,
        "support-tickets",
        "/tickets",
    )
    assert (args.max_new_tokens, args.batching.max_batch_size, args.compile) == (7, 4, True)

    alone, route = serve_args(read_local_run(_write(tmp_path, [job])), "/out")
    assert (alone.variant, alone.compile, route, alone.task) == (Variant.BEST, False, "/", Task.TEXT_CLASSIFICATION)


def _result(before: float, after: float, int8_accepted: bool = True) -> RunReport:
    variants = {
        "full": VariantReport(uri="/o/variants/full", metrics={"accuracy": after}),
        "int8": VariantReport(uri="/o/variants/int8", metrics={"accuracy": after}, accepted=int8_accepted),
    }
    return RunReport(
        stage=Stage.DONE,
        metrics_before={"accuracy": before},
        metrics_after={"accuracy": after},
        variants=variants,
        best_variant="int8" if int8_accepted else "full",
        manifest_uri="/o/kubetune.json",
        spec_digest="h",
    )


@pytest.mark.parametrize(
    ("promotion", "before", "after", "int8_accepted", "passed", "reason"),
    [
        ({}, 0.2, 0.9, True, True, "Passed"),
        ({"minImprovement": 0.8}, 0.2, 0.9, True, False, "ImprovementTooSmall"),
        ({"minValue": 0.95}, 0.2, 0.9, True, False, "OutOfBound"),
        ({"requireCompressed": True}, 0.2, 0.9, False, False, "NoCompressedVariant"),
        ({"enabled": False}, 0.2, 0.9, True, False, "PromotionDisabled"),
    ],
)
def test_the_jobs_gate_judges_the_local_result(
    tmp_path: Path,
    promotion: dict[str, Any],
    before: float,
    after: float,
    int8_accepted: bool,
    passed: bool,
    reason: str,
) -> None:
    job, _ = _documents()
    job["spec"]["promotion"] = promotion
    verdict = judged(read_local_run(_write(tmp_path, [job])).job, _result(before, after, int8_accepted))
    assert (verdict.passed, verdict.reason.value) == (passed, reason)


def test_the_example_request_uses_a_record_of_the_data(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "my invoice is wrong", "label": "billing"}\n{"text": "x", "label": "y"}\n')
    assert sample_of(str(data), Task.TEXT_CLASSIFICATION) == "my invoice is wrong"
    assert sample_of("s3://bucket/train.jsonl", Task.TEXT_CLASSIFICATION) is None
    images = tmp_path / "images" / "cat"
    images.mkdir(parents=True)
    (images / "1.png").write_bytes(b"\x89PNG")
    (images / "0.bmp").write_bytes(b"BM")  # first, but of a format the endpoint refuses
    assert sample_of(str(tmp_path / "images"), Task.IMAGE_CLASSIFICATION) == "iVBORw=="

    text = example_request(Task.TEXT_CLASSIFICATION, "http://127.0.0.1:8000", "my invoice is wrong")
    assert text.curl() == (
        "curl -s http://127.0.0.1:8000/v1/predict -H 'Content-Type: application/json' "
        '-d \'{"inputs": "my invoice is wrong"}\''
    )
    chat = example_request(Task.CAUSAL_LM, "http://127.0.0.1:8000/lm", None)
    assert chat == Endpoint("http://127.0.0.1:8000/lm", "/v1/chat/completions", chat.body)
    assert chat.body["messages"][0]["role"] == "user"


def test_answers_are_shown_in_a_line_and_compiling_is_opt_in() -> None:
    prediction = {"predictions": [{"label": "billing", "scores": {"billing": 0.9}}]}
    assert shown_answer(prediction) == "billing (score 0.90)"
    completion = {"choices": [{"message": {"role": "assistant", "content": "Hello"}}]}
    assert shown_answer(completion) == "'Hello'"
    assert (local_compile(None), local_compile(False), local_compile(True)) == (False, False, True)


def test_a_local_run_trains_on_the_workers_and_sharding_the_job_asks(tmp_path: Path) -> None:
    documents = _documents()
    documents[0]["spec"].setdefault("resources", {}).update({"workers": 3, "sharding": "fsdp"})
    local = read_local_run(_write(tmp_path, documents))
    assert (local.workers().workers, local.workers().sharding) == (3, Sharding.FSDP)
    assert local.workers(2).workers == 2  # --workers
