"""The import contracts of `.importlinter` hold, and an import against the operator's layers breaks them."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

from ..conftest import REPO_ROOT

CONFIG = REPO_ROOT / ".importlinter"
LAYERS = "importlinter:contract:operator-layers"
# The package the copy of the operator is imported as: its own name, so the installed kubetune is never read.
COPY = "layercheck"


# When this checkout is on sys.path beside another copy of kubetune (an installed one), `kubetune` is a
# namespace with both, and import-linter would read both: the other copy's portions are left out.
ONLY_THIS_CHECKOUT = (
    "import os, sys\n"
    f"mine = {str(REPO_ROOT / 'operator')!r}\n"
    "def portion(entry): return os.path.join(entry or '.', 'kubetune', 'operator')\n"
    "if any(os.path.realpath(portion(p)) == mine for p in sys.path):\n"
    "    sys.path[:] = [p for p in sys.path if not os.path.isdir(portion(p)) or os.path.realpath(portion(p)) == mine]\n"
)


def lint_imports(config: Path, cwd: Path, *path: Path) -> subprocess.CompletedProcess[str]:
    """Run import-linter on `config` in a fresh interpreter (with `path` first on sys.path)."""
    code = (
        ONLY_THIS_CHECKOUT + "import sys\n"
        f"sys.path[:0] = {[str(p) for p in path]!r}\n"
        "from importlinter.cli import lint_imports\n"
        f"sys.exit(lint_imports(config_filename={str(config)!r}, no_cache=True, no_logo=True))"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_are_kept() -> None:
    result = lint_imports(CONFIG, REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_every_operator_package_is_in_a_layer_or_a_contract() -> None:
    """A new sub-package of the operator gets a place in the order, not a way around it."""
    config = configparser.ConfigParser()
    config.read(CONFIG)
    named = " ".join(section.get("layers", "") + section.get("source_modules", "") for section in config.values())
    packages = {path.parent.name for path in (REPO_ROOT / "operator").glob("*/__init__.py")}
    assert {p for p in packages if f"kubetune.operator.{p}" not in named} == set()


def operator_copy(root: Path) -> Path:
    """A copy of the operator importable as `layercheck.operator`, and the layers contract pointed at it."""
    shutil.copytree(REPO_ROOT / "operator", root / COPY / "operator", ignore=shutil.ignore_patterns("__pycache__"))
    for init in (root / COPY / "__init__.py", root / COPY / "operator" / "__init__.py"):
        init.touch()
    for source in (root / COPY).rglob("*.py"):
        source.write_text(source.read_text().replace("kubetune.operator", f"{COPY}.operator"))
    original = configparser.ConfigParser()
    original.read(CONFIG)
    layers = original[LAYERS]["layers"].replace("kubetune.operator", f"{COPY}.operator").replace("\n", "\n    ")
    config = root / "layers.ini"
    config.write_text(
        f"[importlinter]\nroot_package = {COPY}\n\n"
        f"[{LAYERS}]\nname = {original[LAYERS]['name']}\ntype = layers\nlayers ={layers}\n"
    )
    return config


def test_an_upward_import_breaks_the_layers(tmp_path: Path) -> None:
    config = operator_copy(tmp_path)
    kept = lint_imports(config, tmp_path, tmp_path)
    assert kept.returncode == 0, kept.stdout + kept.stderr  # the copy alone keeps the contract

    # Planning that reaches up into the builders, as it did for RunRequest.
    planning = tmp_path / COPY / "operator" / "planning" / "schedule.py"
    planning.write_text(planning.read_text() + f"\nfrom {COPY}.operator.builders import pods as pods\n")
    broken = lint_imports(config, tmp_path, tmp_path)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "BROKEN" in broken.stdout
    assert f"{COPY}.operator.planning.schedule -> {COPY}.operator.builders.pods" in broken.stdout
