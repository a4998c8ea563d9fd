"""The Serve application over real HTTP on a local Ray: a MiniLM text classifier, a tiny causal LM, a tiny ViT.

Every answer is checked against the exported model's own output, computed here with
transformers directly.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from .conftest import minilm_dir
from .test_served_images import png_bomb, tiff_bomb
from .tiny import tiny_llama

pytestmark = pytest.mark.runtime

LABELS = ["sports", "science", "music", "cooking"]
TOKEN = "s3cret-token-for-tests"
FAULT = "__make_the_model_fail__"
ENV = {"KUBETUNE_TEST_ENDPOINT_TOKEN": TOKEN, "KUBETUNE_FAULTS": f"serve_input={FAULT}"}


def text_classifier(folder: Path) -> Path:
    """MiniLM with a seeded four-label head, saved as an exported variant is."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_dir(), num_labels=4, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}
    )
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(folder)
    return folder


def image_classifier(folder: Path) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(5)
    labels = ["cat", "dog", "bird"]
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    )  # fmt: skip
    config.id2label, config.label2id = dict(enumerate(labels)), {n: i for i, n in enumerate(labels)}
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def png(seed: int) -> bytes:
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand((24, 24, 3), generator=generator) * 255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class Endpoint:
    def __init__(self, base: str) -> None:
        self.base = base

    def call(
        self, method: str, path: str, body: Any = None, token: str | None = TOKEN, raw: bytes | None = None
    ) -> tuple[int, dict[str, str], Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=120) as response:
                text = response.read().decode()
                status, found = response.status, dict(response.headers)
        except urllib.error.HTTPError as error:
            text, status, found = error.read().decode(), error.code, dict(error.headers)
        is_json = found.get("content-type", "").startswith("application/json")
        return status, found, json.loads(text) if is_json else text


@pytest.fixture(scope="module")
def served(ray_session: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Serve on the session's Ray with three applications: /text (behind a token), /lm and /image."""
    from kubetune.runtime.contract.serving import ServeAppArgs
    from kubetune.runtime.serving.app import application, build
    from ray import serve

    from ..integration.test_operator_restarts import free_port

    folders = {
        "text": text_classifier(tmp_path_factory.mktemp("text")),
        "lm": tiny_llama(tmp_path_factory.mktemp("lm")),
        "image": image_classifier(tmp_path_factory.mktemp("image")),
    }
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    text_args = ServeAppArgs.model_validate(
        {"modelUri": str(folders["text"]), "modelName": "topics", "authTokenEnv": "KUBETUNE_TEST_ENDPOINT_TOKEN",
         "maxInputsPerRequest": 8, "maxInputChars": 200, "batching": {"maxBatchSize": 16, "batchWaitTimeoutMs": 20}}
    )  # fmt: skip
    # Three replicas on the session's two CPUs. The text classifier runs compiled (its default), the others eager.
    serve.run(application(text_args, num_cpus=0.5, env=ENV), name="text", route_prefix="/text")
    for name in ("lm", "image"):
        args = ServeAppArgs(model_uri=str(folders[name]), max_new_tokens=12)
        serve.run(application(args, num_cpus=0.5, env=ENV), name=name, route_prefix=f"/{name}")
    assert build(args.to_wire()) is not None  # what a Serve config's import path names builds the same
    try:
        yield {"base": f"http://127.0.0.1:{port}", "folders": folders}
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]


@pytest.fixture
def text(served: dict[str, Any]) -> Endpoint:
    return Endpoint(served["base"] + "/text")


@pytest.fixture
def lm(served: dict[str, Any]) -> Endpoint:
    return Endpoint(served["base"] + "/lm")


def expected_scores(folder: Path, texts: list[str]) -> list[list[float]]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model: Any = AutoModelForSequenceClassification.from_pretrained(folder)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        logits = model(**tokenizer(texts, padding=True, truncation=True, return_tensors="pt")).logits
    return torch.softmax(logits, dim=-1).tolist()


def test_the_text_classifier_answers_as_the_exported_model_does(served: dict[str, Any], text: Endpoint) -> None:
    texts = ["the team won the final match", "a telescope found a new planet", "slow cooked tomato sauce"]
    status, _, body = text.call("POST", "/v1/predict", {"inputs": texts})
    assert status == 200 and body["model"] == "topics"
    for prediction, scores in zip(body["predictions"], expected_scores(served["folders"]["text"], texts), strict=True):
        assert prediction["label"] == LABELS[max(range(4), key=scores.__getitem__)]
        assert [prediction["scores"][label] for label in LABELS] == pytest.approx(scores, abs=1e-4)
    status, _, single = text.call("POST", "/v1/predict", {"inputs": texts[0]})
    assert status == 200 and single["predictions"][0]["label"] == body["predictions"][0]["label"]
    assert single["predictions"][0]["scores"] == pytest.approx(body["predictions"][0]["scores"], abs=1e-4)
    status, _, models = text.call("GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["topics"]


def test_concurrent_requests_are_batched(text: Endpoint) -> None:
    def one(index: int) -> int:
        status, headers, _ = text.call("POST", "/v1/predict", {"inputs": f"request number {index}"})
        assert status == 200
        return int(headers["x-batch-size"])

    with ThreadPoolExecutor(max_workers=24) as pool:
        sizes = list(pool.map(one, range(96)))
    assert max(sizes) > 1, sizes


def test_a_bearer_token_is_required_and_compared(text: Endpoint) -> None:
    for token in (None, "wrong-token", TOKEN + "x"):
        status, headers, body = text.call("POST", "/v1/predict", {"inputs": "hello"}, token=token)
        assert status == 401 and headers["www-authenticate"].startswith("Bearer")
        assert body["error"]["type"] == "authentication_error"
    assert text.call("POST", "/v1/predict", {"inputs": "hello"})[0] == 200
    status, _, health = text.call("GET", "/healthz", token=None)
    assert status == 200 and health == {"status": "ok"}  # nothing about the model without the token


@pytest.mark.parametrize(
    ("body", "raw", "status", "param"),
    [
        (None, b'{"inputs": [', 400, None),
        ({"inputs": 3}, None, 422, "inputs"),
        ({"inputs": ["fine", 7]}, None, 422, "inputs"),
        ({"text": "no inputs"}, None, 422, "inputs"),
        ({"inputs": ["a"] * 9}, None, 413, "inputs"),
        ({"inputs": ["short", "x" * 201]}, None, 413, "inputs[1]"),
        ({"inputs": []}, None, 422, "inputs"),
    ],
)
def test_bad_requests_get_a_json_error_naming_the_problem(
    text: Endpoint, body: Any, raw: bytes | None, status: int, param: str | None
) -> None:
    found, headers, answer = text.call("POST", "/v1/predict", body, raw=raw)
    assert found == status and headers["content-type"].startswith("application/json")
    assert answer["error"]["param"] == param and answer["error"]["message"]
    assert "Traceback" not in json.dumps(answer)


def test_a_failing_model_call_is_a_500_and_the_replica_goes_on(text: Endpoint) -> None:
    def send(value: str) -> int:
        return text.call("POST", "/v1/predict", {"inputs": value})[0]

    with ThreadPoolExecutor(max_workers=8) as pool:  # the fault arrives inside a batch of good requests
        statuses = list(pool.map(send, [FAULT if i == 3 else f"fine {i}" for i in range(8)]))
    assert statuses[3] == 500 and all(status == 200 for i, status in enumerate(statuses) if i != 3)
    status, _, body = text.call("POST", "/v1/predict", {"inputs": FAULT})
    assert status == 500 and body["error"]["type"] == "server_error" and "Traceback" not in json.dumps(body)
    assert send("still serving") == 200


def greedy(folder: Path, prompt: str, max_new_tokens: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
    generated = out[0, len(ids) :].tolist()
    if tokenizer.eos_token_id in generated:
        generated = generated[: generated.index(tokenizer.eos_token_id)]
    return str(tokenizer.decode(generated, skip_special_tokens=True))


def test_completions_are_the_models_greedy_generation(served: dict[str, Any], lm: Endpoint) -> None:
    prompts = ["the weather today is", "once upon a time"]
    status, _, body = lm.call("POST", "/v1/completions", {"prompt": prompts, "max_tokens": 6, "temperature": 0})
    assert status == 200 and body["object"] == "text_completion"
    for choice, prompt in zip(body["choices"], prompts, strict=True):
        assert choice["text"] == greedy(served["folders"]["lm"], prompt, 6)
    assert body["usage"]["completion_tokens"] <= 12
    # max_tokens is capped by maxNewTokens (12 here).
    status, _, capped = lm.call("POST", "/v1/completions", {"prompt": "a", "max_tokens": 500, "temperature": 0})
    assert status == 200 and capped["usage"]["completion_tokens"] <= 12
    assert capped["choices"][0]["text"] == greedy(served["folders"]["lm"], "a", 12)


def test_a_streamed_completion_is_server_sent_events_ending_in_done(lm: Endpoint) -> None:
    status, headers, text = lm.call(
        "POST", "/v1/completions", {"prompt": "the weather", "max_tokens": 8, "temperature": 0, "stream": True}
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) >= 3
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    status, _, whole = lm.call("POST", "/v1/completions", {"prompt": "the weather", "max_tokens": 8, "temperature": 0})
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == whole["choices"][0]["text"]


def test_the_openai_client_talks_to_the_endpoint(served: dict[str, Any], lm: Endpoint) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=lm.base + "/v1", api_key="unused")
    completion = client.completions.create(model="lm", prompt="the weather today is", max_tokens=5, temperature=0)
    assert completion.choices[0].text == greedy(served["folders"]["lm"], "the weather today is", 5)
    messages: Any = [{"role": "user", "content": "hello there"}]
    chat = client.chat.completions.create(model="lm", messages=messages, max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("stop", "length")
    assert chat.choices[0].message.content == greedy(served["folders"]["lm"], "user: hello there\nassistant:", 5)
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model="lm", messages=messages, max_tokens=5, temperature=0, stream=True
        )
    ]
    assert "".join(pieces) == chat.choices[0].message.content
    models = client.models.list()
    assert [model.id for model in models.data] == [served["folders"]["lm"].name]


def test_stop_sequences_cut_the_completion(served: dict[str, Any], lm: Endpoint) -> None:
    full = greedy(served["folders"]["lm"], "once upon a time", 12)
    words = full.split()
    if len(words) < 2:
        pytest.skip(f"the tiny model's completion is too short to cut: {full!r}")
    stop = words[1]
    status, _, body = lm.call(
        "POST", "/v1/completions", {"prompt": "once upon a time", "max_tokens": 12, "temperature": 0, "stop": [stop]}
    )
    assert status == 200 and body["choices"][0]["text"] == full[: full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


def test_the_image_classifier_answers_base64_images(served: dict[str, Any]) -> None:
    from kubetune.runtime.data.images import open_image
    from transformers import ViTForImageClassification, ViTImageProcessor

    images = [png(seed) for seed in range(3)]
    status, _, body = Endpoint(served["base"] + "/image").call(
        "POST", "/v1/predict", {"inputs": [base64.b64encode(image).decode() for image in images]}
    )
    assert status == 200
    folder = served["folders"]["image"]
    model: Any = ViTForImageClassification.from_pretrained(folder)
    model.eval()
    processor = ViTImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        logits = model(**processor(images=[open_image(image) for image in images], return_tensors="pt")).logits
    for prediction, scores in zip(body["predictions"], torch.softmax(logits, dim=-1).tolist(), strict=True):
        assert [prediction["scores"][name] for name in ("cat", "dog", "bird")] == pytest.approx(scores, abs=1e-4)
    status, _, bad = Endpoint(served["base"] + "/image").call("POST", "/v1/predict", {"inputs": ["not base64!"]})
    assert status == 400 and bad["error"]["param"] == "inputs[0]"
    refused = [  # from their headers, before anything is decoded
        (png_bomb(), 413, "inputs[1] is 9000x9000 pixels: too large, at most 16777216 pixels (4096x4096)"),
        (tiff_bomb(), 415, "inputs[1] is a TIFF image: unsupported format (accepted: PNG, JPEG or WebP)"),
    ]
    for image, code, message in refused:
        inputs = [base64.b64encode(images[0]).decode(), base64.b64encode(image).decode()]
        status, _, bad = Endpoint(served["base"] + "/image").call("POST", "/v1/predict", {"inputs": inputs})
        assert (status, bad["error"]["message"], bad["error"]["param"]) == (code, message, "inputs[1]"), bad


def test_a_classifier_has_no_completions(served: dict[str, Any], text: Endpoint) -> None:
    status, _, body = text.call("POST", "/v1/completions", {"prompt": "hi"})
    assert status == 404 and "text-classification" in body["error"]["message"]


def test_requests_latency_and_batch_sizes_are_prometheus_metrics(text: Endpoint) -> None:
    """Through Ray Serve's metrics: Ray's metrics agent exports them in Prometheus's format."""
    import ray

    from ..integration.harness import eventually

    for _ in range(3):
        assert text.call("POST", "/v1/predict", {"inputs": "counted"})[0] == 200
    port = next(node["MetricsExportPort"] for node in ray.nodes() if node["Alive"])  # type: ignore[no-untyped-call]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    wanted = (
        "kubetune_serve_requests_total",
        "kubetune_serve_request_seconds_bucket",
        "kubetune_serve_batch_size_bucket",
    )

    last: list[str] = []

    def counted() -> bool:
        """Every metric is there, and the answered requests are counted by route and status."""
        try:
            with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                lines = response.read().decode().splitlines()
        except urllib.error.URLError as error:  # the agent starts its exporter a little after Ray
            last[:] = [str(error)]
            return False
        last[:] = [line for line in lines if any(name in line for name in wanted)]
        answered = [
            float(line.rsplit(" ", 1)[1])
            for line in last
            if line.startswith("ray_kubetune_serve_requests_total") and 'route="/v1/predict"' in line
            and 'status="200"' in line
        ]  # fmt: skip
        return all(any(name in line for line in last) for name in wanted) and sum(answered) >= 3

    try:
        eventually(counted, timeout=120, interval=2, what="kubetune's serving metrics at Ray's metrics port")
    except AssertionError as error:
        raise AssertionError(f"{error}; the metrics' lines last seen: {last}") from None


def test_serve_accepts_the_config_the_operator_writes(served: dict[str, Any]) -> None:
    """The RayService's serveConfigV2 is what Ray Serve's own schema accepts, and its args build the app."""
    import yaml
    from kubetune.operator.api.manifests import parse
    from kubetune.operator.api.modeldeployment import ModelDeployment, ServedModel
    from kubetune.operator.builders.modeldeployment import build_ray_service
    from kubetune.operator.settings import Settings
    from kubetune.runtime.serving.app import build
    from ray.serve.schema import ServeDeploySchema

    from ..conftest import REPO_ROOT

    document = yaml.safe_load((REPO_ROOT / "examples" / "modeldeployment.yaml").read_text())
    document["metadata"].update(namespace="ml", uid="md-uid")
    deployment = parse(document)
    assert isinstance(deployment, ModelDeployment)
    served_model = ServedModel(uri=str(served["folders"]["text"]), fine_tune_job="tickets", run=2, variant="full")
    config = yaml.safe_load(build_ray_service(deployment, served_model, Settings())["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(config)
    assert schema.logging_config is not None and schema.logging_config.enable_access_log is False
    [app] = schema.applications
    assert app.import_path == "kubetune.runtime.serving.app:build"
    assert build(app.args) is not None


def test_a_run_with_a_manifest_of_the_first_version_is_served_by_its_best_variant(tmp_path: Path) -> None:
    """A run exported before kubetune.json was typed (lineage.specHash) still loads, as a replica loads it."""
    from kubetune.runtime.contract import Task
    from kubetune.runtime.contract.serving import ServeAppArgs
    from kubetune.runtime.io.settings import RuntimeSettings
    from kubetune.runtime.serving.loading import load

    from ..unit.test_artifact_manifest import VERSION_1

    root = tmp_path / "run"
    text_classifier(root / "variants" / "int8")  # the manifest's best variant
    (root / "kubetune.json").write_text(VERSION_1, encoding="utf-8")
    loaded = load(ServeAppArgs(model_uri=str(root), compile=False), RuntimeSettings.from_environment())
    assert (loaded.folder, loaded.task, loaded.name) == (
        root / "variants" / "int8", Task.TEXT_CLASSIFICATION, "support-tickets",
    )  # fmt: skip
