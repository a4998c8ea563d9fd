"""Images for image classification: an image folder (<root>/<label>/<file>) or image columns of records."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from .errors import DataError
from .records import local_data
from .settings import RuntimeSettings

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def _check_image(image: str | bytes, where: str, field: str) -> None:
    """Open and verify the image now, so a broken file fails the load, not a training step."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
            opened.verify()
    except (OSError, UnidentifiedImageError, SyntaxError) as error:
        raise DataError(field, f"cannot read the image {where}: {error}") from None


def read_image_folder(uri: str, settings: RuntimeSettings, field: str) -> tuple[list[Any], list[Any]]:
    """(image paths, label names): every image file below a label folder of `uri`."""
    root = local_data(uri, settings, field)
    if not root.is_dir():
        raise DataError(field, f"{uri} is not a folder; an image folder holds one sub-folder per label")
    images: list[Any] = []
    labels: list[Any] = []
    for label_folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for file in sorted(p for p in label_folder.rglob("*") if p.is_file()):
            if file.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            _check_image(str(file), f"{uri}/{file.relative_to(root).as_posix()}", field)
            images.append(str(file))
            labels.append(label_folder.name)
    if not images:
        raise DataError(
            field, f"no examples in {uri}: expected <label>/<image> files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return images, labels


def resolve_images(values: list[Any], uri: str, settings: RuntimeSettings, field: str) -> list[Any]:
    """Image column values as bytes or absolute paths; relative paths are relative to the data file's folder."""
    location = local_data(uri, settings, "data.train")
    base = location if location.is_dir() else location.parent
    resolved: list[Any] = []
    for number, value in enumerate(values, start=1):
        if isinstance(value, dict) and "bytes" in value:  # the way datasets/parquet store images
            value = value["bytes"]
        if isinstance(value, bytes):
            image: Any = value
        else:
            path = Path(str(value))
            image = str(path if path.is_absolute() else base / path)
        _check_image(image, f"in example {number} of {uri}", field)
        resolved.append(image)
    return resolved


def open_image(image: str | bytes) -> Any:
    """The image as an RGB PIL image."""
    from PIL import Image

    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
        return opened.convert("RGB")
