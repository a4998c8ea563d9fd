"""Local storage paths stay where they belong: pvc:// inside its claim, outputs and uploads inside their folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubetune.runtime.io import storage
from kubetune.runtime.io.errors import StorageError
from kubetune.runtime.io.settings import RuntimeSettings
from kubetune.runtime.io.storage import inside, local_path, output_path, upload_directory

OUTPUT_URI = "pvc://shared/runs/job-1"


@pytest.fixture
def settings(tmp_path: Path) -> RuntimeSettings:
    (tmp_path / "pvc" / "shared").mkdir(parents=True)
    return RuntimeSettings(pvc_root=tmp_path / "pvc", cache_dir=tmp_path / "cache")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder next to the output that no write may reach."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_text("keep out")
    return folder


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("pvc://shared/models/bert", "shared/models/bert"),
        ("pvc://shared/a/../b", "shared/b"),
        ("pvc://shared/./a/", "shared/a"),
        ("pvc://shared", "shared"),
    ],
)
def test_pvc_paths_inside_the_claim_resolve_lexically(settings: RuntimeSettings, uri: str, expected: str) -> None:
    assert local_path(uri, settings) == settings.pvc_root / expected


@pytest.mark.parametrize(
    "uri",
    [
        "pvc://shared//etc/passwd",
        "pvc://shared/../../tmp/x",
        "pvc://shared/a/../../other/x",
        "pvc://shared/..",
        "pvc://../etc",
        "pvc:///etc/passwd",
    ],
)
def test_pvc_paths_that_leave_the_claim_are_refused(settings: RuntimeSettings, uri: str) -> None:
    with pytest.raises(StorageError) as refused:
        local_path(uri, settings)
    assert refused.value.where == uri


def test_a_pvc_symlink_out_of_the_claim_is_refused(settings: RuntimeSettings, outside: Path) -> None:
    claim = settings.pvc_root / "shared"
    (claim / "escape").symlink_to(outside, target_is_directory=True)
    (claim / "real").mkdir()
    (claim / "alias").symlink_to(claim / "real", target_is_directory=True)
    with pytest.raises(StorageError, match="symlink") as refused:
        local_path("pvc://shared/escape/secret.txt", settings)
    assert refused.value.where == "pvc://shared/escape/secret.txt"
    # A link that stays inside the claim is an ordinary folder.
    assert local_path("pvc://shared/alias/x", settings) == claim / "alias" / "x"


def test_inside_refuses_absolute_and_climbing_paths(tmp_path: Path) -> None:
    assert inside(tmp_path, "a//b/./c", "uri") == tmp_path / "a" / "b" / "c"
    for relative in ("/etc/passwd", "../x", "a/../../x"):
        with pytest.raises(StorageError, match=r"^uri: "):
            inside(tmp_path, relative, "uri")


def _output_root(settings: RuntimeSettings) -> Path:
    root = local_path(OUTPUT_URI, settings)
    root.mkdir(parents=True)
    return root


def test_an_output_folder_linked_elsewhere_is_refused(settings: RuntimeSettings, outside: Path) -> None:
    root = _output_root(settings)
    (root / "variants").symlink_to(outside, target_is_directory=True)
    with pytest.raises(StorageError, match="symlink") as refused:
        output_path(root, "variants/full", OUTPUT_URI)
    assert refused.value.where == OUTPUT_URI


def test_a_link_deep_inside_an_existing_output_folder_is_refused(settings: RuntimeSettings, outside: Path) -> None:
    root = _output_root(settings)
    full = root / "variants" / "full"
    full.mkdir(parents=True)
    # save_pretrained would write through this file link into the secret.
    (full / "model.safetensors").symlink_to(outside / "secret.txt")
    with pytest.raises(StorageError, match=r"model\.safetensors") as refused:
        output_path(root, "variants", OUTPUT_URI)
    assert refused.value.where == OUTPUT_URI


@pytest.mark.parametrize("target", ["secret.txt", "not-yet-there.txt"])
def test_an_output_file_linked_elsewhere_is_refused(settings: RuntimeSettings, outside: Path, target: str) -> None:
    root = _output_root(settings)
    (root / "kubetune.json").symlink_to(outside / target)  # a dangling link would create the file there
    with pytest.raises(StorageError, match=r"kubetune\.json"):
        output_path(root, "kubetune.json", OUTPUT_URI)
    assert not (outside / "not-yet-there.txt").exists()


def test_links_that_stay_inside_the_output_are_allowed(settings: RuntimeSettings) -> None:
    root = _output_root(settings)
    (root / "variants" / "full").mkdir(parents=True)
    (root / "variants" / "latest").symlink_to(root / "variants" / "full", target_is_directory=True)
    assert output_path(root, "variants", OUTPUT_URI) == root / "variants"
    assert output_path(root, "variants/latest/config.json", OUTPUT_URI) == root / "variants/latest/config.json"


class RecordingClient:
    """Stands in for boto3's S3 client: records what would be uploaded."""

    def __init__(self) -> None:
        self.uploads: dict[str, str] = {}

    def upload_file(self, path: str, bucket: str, key: str) -> None:
        self.uploads[f"{bucket}/{key}"] = Path(path).read_text()


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> RecordingClient:
    recording = RecordingClient()
    monkeypatch.setattr(storage, "s3_client", lambda: recording)
    return recording


def _staged(tmp_path: Path) -> Path:
    folder = tmp_path / "staged"
    (folder / "variants").mkdir(parents=True)
    (folder / "kubetune.json").write_text("{}")
    return folder


@pytest.mark.parametrize("directory", [False, True])
def test_upload_refuses_links_out_of_the_folder(
    tmp_path: Path, outside: Path, client: RecordingClient, directory: bool
) -> None:
    folder = _staged(tmp_path)
    link = folder / "variants" / "leak"
    link.symlink_to(outside if directory else outside / "secret.txt", target_is_directory=directory)
    with pytest.raises(StorageError, match="symlink") as refused:
        upload_directory(folder, "s3://runs/job-1")
    assert refused.value.where == "s3://runs/job-1"
    assert client.uploads == {}


def test_upload_keeps_links_inside_the_folder(tmp_path: Path, client: RecordingClient) -> None:
    folder = _staged(tmp_path)
    (folder / "variants" / "manifest-copy.json").symlink_to(folder / "kubetune.json")
    upload_directory(folder, "s3://runs/job-1")
    assert client.uploads == {"runs/job-1/kubetune.json": "{}", "runs/job-1/variants/manifest-copy.json": "{}"}
