"""Images for image classification: an image folder (<root>/<label>/<file>) or image columns of records."""

from __future__ import annotations

import io
from enum import StrEnum
from pathlib import Path
from typing import Any

from kubetune.runtime.io.errors import DataError
from kubetune.runtime.io.settings import RuntimeSettings

from .readers import local_data

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# What an endpoint takes from its clients: the web's usual formats (Pillow's names), and
# images of at most this many pixels. A few kilobytes of compressed image can decode to
# gigabytes (a 14 KB TIFF to 13000x13000), so the size is checked from the header, before
# anything is decoded; 4096x4096 decodes to 48 MiB of RGB.
SERVED_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_SERVED_SIDE = 4096
MAX_SERVED_PIXELS = MAX_SERVED_SIDE * MAX_SERVED_SIDE
LIMIT = f"at most {MAX_SERVED_PIXELS} pixels ({MAX_SERVED_SIDE}x{MAX_SERVED_SIDE})"


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
    base: Path | None = None  # found when a relative path needs it (a Hub dataset's images are bytes)
    resolved: list[Any] = []
    for number, value in enumerate(values, start=1):
        if isinstance(value, dict) and {"bytes", "path"} & set(value):  # the way datasets/parquet store images
            value = value["bytes"] if value.get("bytes") is not None else value.get("path")
        if isinstance(value, bytes):
            image: Any = value
        else:
            path = Path(str(value))
            if base is None and not path.is_absolute():
                location = local_data(uri, settings, "data.train")
                base = location if location.is_dir() else location.parent
            image = str(path if path.is_absolute() or base is None else base / path)
        _check_image(image, f"in example {number} of {uri}", field)
        resolved.append(image)
    return resolved


def open_image(image: str | bytes) -> Any:
    """The image as an RGB PIL image."""
    from PIL import Image

    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
        return opened.convert("RGB")


class ImageProblem(StrEnum):
    """Why an endpoint refuses an image."""

    UNREADABLE = "unreadable"
    UNSUPPORTED_FORMAT = "unsupported-format"
    TOO_LARGE = "too-large"


class ImageRejectedError(ValueError):
    """An image an endpoint does not take; the message names the limit or the accepted formats."""

    def __init__(self, problem: ImageProblem, message: str) -> None:
        super().__init__(message)
        self.problem = problem


def _format_of(image: bytes) -> str | None:
    """The format Pillow recognises in the image's header, whatever it is (nothing is decoded)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image)) as opened:
            return opened.format
    except Exception:  # Pillow's header parsers raise many kinds of error on arbitrary bytes
        return None


def _open_served(image: bytes) -> Any:
    """The image opened from its header only, once its format and size are what an endpoint takes."""
    from PIL import Image, UnidentifiedImageError

    accepted = "PNG, JPEG or WebP"
    try:
        opened = Image.open(io.BytesIO(image), formats=SERVED_FORMATS)
    except Image.DecompressionBombError as error:  # Pillow's own, far higher limit
        raise ImageRejectedError(ImageProblem.TOO_LARGE, f"{error}; {LIMIT}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        found = _format_of(image)
        if found is None:
            raise ImageRejectedError(ImageProblem.UNREADABLE, f"not an image ({accepted})") from None
        raise ImageRejectedError(
            ImageProblem.UNSUPPORTED_FORMAT, f"a {found} image: unsupported format (accepted: {accepted})"
        ) from None
    width, height = opened.size
    if width * height > MAX_SERVED_PIXELS:
        opened.close()
        raise ImageRejectedError(
            ImageProblem.TOO_LARGE,
            f"{width}x{height} pixels: too large, {LIMIT}",
        )
    return opened


def check_served_image(image: bytes) -> None:
    """Raise ImageRejectedError unless an endpoint takes `image`: read from its header, nothing decoded."""
    _open_served(image).close()


def open_served_image(image: bytes) -> Any:
    """A client's image as an RGB PIL image, decoded only once its format and size are checked."""
    with _open_served(image) as opened:
        return opened.convert("RGB")


def image_features(processor: Any, images: list[bytes]) -> dict[str, Any]:
    """The image processor's tensors for clients' images, decoded and processed one at a time.

    Only one decoded image is alive at any time, whatever the number of images in the batch.
    """
    import torch

    parts = [dict(processor(images=[open_served_image(image)], return_tensors="pt")) for image in images]
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
