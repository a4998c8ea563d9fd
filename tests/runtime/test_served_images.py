"""Images a client sends an endpoint: the web's formats only, and no decompression bomb ever decoded.

A bomb is a small, highly compressed file of a huge blank image. It is refused from its
header, with the limit named, before anything is decoded; what the endpoint takes is
decoded one image at a time.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest
from kubetune.runtime.data.images import (
    MAX_SERVED_PIXELS,
    ImageProblem,
    ImageRejectedError,
    check_served_image,
    image_features,
    open_served_image,
)
from kubetune.runtime.serving.api import decode_images
from kubetune.runtime.serving.errors import RequestError

pytestmark = pytest.mark.runtime

BOMB_SIDE = 9000  # 81 Mpx: 232 MiB of RGB from about 10 KB of PNG
# Peak memory a refused bomb may cost (Python's and Pillow's own allocations aside).
REFUSAL_RSS_MIB = 16


def encoded(image: Any, format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png_bomb(side: int = BOMB_SIDE) -> bytes:
    from PIL import Image

    return encoded(Image.new("1", (side, side)), "PNG", optimize=True)


def tiff_bomb() -> bytes:
    from PIL import Image

    return encoded(Image.new("1", (13000, 13000)), "TIFF", compression="group4")


def small(format: str) -> bytes:
    from PIL import Image

    return encoded(Image.new("RGB", (24, 16), (200, 30, 90)), format)


def test_a_bomb_is_small_enough_to_send() -> None:
    bomb = png_bomb()
    assert len(base64.b64encode(bomb)) <= 16384  # within the endpoint's default maxInputChars
    assert BOMB_SIDE * BOMB_SIDE > MAX_SERVED_PIXELS


@pytest.mark.parametrize("format", ["PNG", "JPEG", "WEBP"])
def test_the_webs_formats_are_decoded(format: str) -> None:
    check_served_image(small(format))
    image = open_served_image(small(format))
    assert (image.mode, image.size) == ("RGB", (24, 16))


@pytest.mark.parametrize(("image", "named"), [(small("BMP"), "BMP"), (small("GIF"), "GIF"), (tiff_bomb(), "TIFF")])
def test_other_formats_are_unsupported_and_named(image: bytes, named: str) -> None:
    with pytest.raises(ImageRejectedError) as caught:
        check_served_image(image)
    assert caught.value.problem == ImageProblem.UNSUPPORTED_FORMAT
    assert str(caught.value) == f"a {named} image: unsupported format (accepted: PNG, JPEG or WebP)"


def test_a_bomb_is_refused_naming_the_limit() -> None:
    with pytest.raises(ImageRejectedError) as caught:
        open_served_image(png_bomb())
    assert caught.value.problem == ImageProblem.TOO_LARGE
    assert str(caught.value) == "9000x9000 pixels: too large, at most 16777216 pixels (4096x4096)"
    bigger = png_bomb(20000)  # past Pillow's own limit, which it raises in its own words
    with pytest.raises(ImageRejectedError, match=r"at most 16777216 pixels \(4096x4096\)"):
        check_served_image(bigger)


def test_a_request_gets_a_client_error_naming_the_image_and_the_problem() -> None:
    fine = base64.b64encode(small("PNG")).decode()
    cases = [
        (png_bomb(), 413, "inputs[1] is 9000x9000 pixels: too large, at most 16777216 pixels (4096x4096)"),
        (small("GIF"), 415, "inputs[1] is a GIF image: unsupported format (accepted: PNG, JPEG or WebP)"),
        (b"plain text, not an image", 400, "inputs[1] is not an image (PNG, JPEG or WebP)"),
    ]
    for image, status, message in cases:
        with pytest.raises(RequestError) as caught:
            decode_images([fine, base64.b64encode(image).decode()])
        assert (caught.value.status, caught.value.message, caught.value.param) == (status, message, "inputs[1]")
    assert decode_images([fine]) == [small("PNG")]


def test_a_batch_is_decoded_one_image_at_a_time() -> None:
    """Each image is processed alone, and the decoded image before it is gone by then."""
    import torch

    decoded: list[weakref.ref[Any]] = []

    def processor(images: list[Any], return_tensors: str) -> dict[str, Any]:
        assert len(images) == 1 and return_tensors == "pt"
        assert [seen() for seen in decoded] == [None] * len(decoded), "an earlier decoded image is still alive"
        decoded.append(weakref.ref(images[0]))
        return {"pixel_values": torch.full((1, 3, 2, 2), float(len(decoded)))}

    features = image_features(processor, [small("PNG"), small("JPEG"), small("WEBP")])
    assert features["pixel_values"].shape == (3, 3, 2, 2)
    assert features["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0]


# Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM), which a child would
# otherwise inherit from its parent's, through fork and exec.
PEAK_RSS = """
import sys
from pathlib import Path
from kubetune.runtime.data import images

def peak_kib():
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))

bomb = Path(sys.argv[1]).read_bytes()
Path("/proc/self/clear_refs").write_text("5")
before = peak_kib()
try:
    getattr(images, sys.argv[2])(bomb)
except images.ImageRejectedError:
    pass
print((peak_kib() - before) // 1024)
"""


def peak_rss_mib(bomb: Path, function: str) -> int:
    """How much a fresh interpreter's peak memory grows while `function` handles the bomb."""
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(bomb), function],
        env=os.environ, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    return int(json.loads(result.stdout.strip().splitlines()[-1]))


def test_a_refused_bomb_costs_no_memory(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb())
    decoded, refused = peak_rss_mib(bomb, "open_image"), peak_rss_mib(bomb, "open_served_image")
    print(f"peak RSS growth for a {BOMB_SIDE}x{BOMB_SIDE} PNG bomb: decoded {decoded} MiB, refused {refused} MiB")
    assert decoded > 200  # what decoding it costs (training data is decoded as it comes)
    assert refused < REFUSAL_RSS_MIB
