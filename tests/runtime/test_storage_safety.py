"""What a run reads from storage cannot write or run anything outside its place.

S3 object keys cannot climb out of the download cache, an output folder whose links lead
elsewhere is refused before training, and checkpoints load without unpickling code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from kubetune.runtime.contract import Hyperparameters
from kubetune.runtime.io.errors import StorageError
from kubetune.runtime.io.settings import RuntimeSettings
from kubetune.runtime.io.storage import download_s3, s3_client
from kubetune.runtime.recipe.pipeline import run_pipeline
from kubetune.runtime.training.checkpoints import TrainingPosition, TrainingState, trainable_state
from kubetune.runtime.training.optim import build_optimizer, build_scheduler
from kubetune.runtime.variants.export import variant_folder
from torch import nn

from .conftest import fast_options, make_spec
from .s3server import s3_endpoint

pytestmark = pytest.mark.runtime
__all__ = ["s3_endpoint"]  # a fixture, used by name


@pytest.mark.parametrize(
    ("uri", "key"),
    [
        ("s3://climbing/prefix", "prefix/../../escape.txt"),  # every object under a prefix
        ("s3://single/prefix/..", "prefix/.."),  # a single object whose name climbs out
        ("s3://absolute/prefix", "prefix//escape.txt"),  # an absolute-looking remainder
    ],
)
def test_object_keys_cannot_leave_the_download_cache(s3_endpoint: str, tmp_path: Path, uri: str, key: str) -> None:
    bucket = uri.removeprefix("s3://").partition("/")[0]  # one per case: moto keeps its buckets between tests
    client = s3_client()
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="prefix/config.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key=key, Body=b"written where it does not belong")
    assert key in [item["Key"] for item in client.list_objects_v2(Bucket=bucket)["Contents"]]  # kept verbatim
    settings = RuntimeSettings(cache_dir=tmp_path / "deep" / "cache")
    with pytest.raises(StorageError) as refused:
        download_s3(uri, settings)
    assert refused.value.where == uri
    assert repr(key) in refused.value.problem
    stray = [path for path in tmp_path.rglob("*") if path.is_file() and path.name != "config.json"]
    assert stray == []


def test_an_output_linked_elsewhere_fails_before_training(tmp_path: Path) -> None:
    output, outside = tmp_path / "out", tmp_path / "outside"
    output.mkdir()
    outside.mkdir()
    (output / "checkpoints").symlink_to(outside, target_is_directory=True)
    # Neither model nor data exist: the run must stop at the output, before it reads anything.
    spec = make_spec(tmp_path / "no-model", tmp_path / "no-data.jsonl", output)
    with pytest.raises(StorageError, match="symlink") as refused:
        run_pipeline(spec, fast_options(output))
    assert refused.value.where == f"file://{output}"
    assert list(outside.iterdir()) == []


def test_variant_folders_linked_elsewhere_are_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "out", tmp_path / "outside"
    (root / "variants").mkdir(parents=True)
    outside.mkdir()
    (root / "variants" / "merged").symlink_to(outside, target_is_directory=True)
    assert variant_folder(root, "full", "s3://runs/job") == root / "variants" / "full"
    with pytest.raises(StorageError, match="s3://runs/job"):
        variant_folder(root, "merged", "s3://runs/job")


def _trained_state() -> tuple[nn.Module, TrainingState]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    hp = Hyperparameters(weight_decay=0.01, warmup_ratio=0.5)
    optimizer = build_optimizer(model, hp)
    scheduler = build_scheduler(optimizer, hp, total_steps=4)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    position = TrainingPosition(epoch=1, batch=2, step=1, epochs_done=0.5, best_metrics={"accuracy": 0.75})
    weights = trainable_state(model)
    return model, TrainingState(weights, weights, optimizer.state_dict(), scheduler.state_dict(), position)


def test_a_checkpoint_round_trips_through_a_weights_only_load(tmp_path: Path) -> None:
    model, saved = _trained_state()
    saved.save(tmp_path)
    loaded = TrainingState.load(tmp_path)
    assert loaded.position == saved.position
    assert loaded.weights.keys() == saved.weights.keys()
    assert all(torch.equal(loaded.weights[name], value) for name, value in saved.weights.items())
    assert loaded.scheduler == saved.scheduler
    # The optimizer resumes from the loaded state as from the saved one.
    optimizer = build_optimizer(model, Hyperparameters(weight_decay=0.01))
    assert loaded.optimizer is not None and saved.optimizer is not None
    optimizer.load_state_dict(loaded.optimizer)
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], saved.optimizer["state"][0]["exp_avg"])


class RunsCode:
    """Unpickled, it calls Path.touch(marker): any other callable could run the same way."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    _, state = _trained_state()
    payload = {
        "weights": state.weights,
        "best_weights": {},
        "optimizer": None,
        "scheduler": None,
        "position": RunsCode(marker),
    }
    torch.save(payload, tmp_path / "training_state.pt")
    with pytest.raises(pickle.UnpicklingError):
        TrainingState.load(tmp_path)
    assert not marker.exists()
