"""Import boundaries between the layers, and the guard against shadowing the stdlib `operator`."""

from __future__ import annotations

import ast
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import REPO_ROOT

# Top-level folder → import name, as mapped in pyproject.toml.
FOLDERS = {"operator": "kubetune.operator", "runtime": "kubetune.runtime", "cli": "kubetune.cli"}
TRAINING_STACK = {"torch", "ray", "transformers", "peft", "torchao", "safetensors", "optuna", "accelerate"}
STDLIB = set(sys.stdlib_module_names)


def module_name(path: Path) -> str:
    folder, *rest = path.relative_to(REPO_ROOT).with_suffix("").parts
    parts = [FOLDERS[folder], *rest]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> Iterator[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                yield ".".join([*base, node.module] if node.module else base)
            else:
                yield node.module or ""


def sources(folder: str) -> list[Path]:
    return sorted((REPO_ROOT / folder).rglob("*.py"))


def offending(folder: str, allowed: object) -> list[str]:
    found = []
    for path in sources(folder):
        for name in imports_of(path):
            if not allowed(name):  # type: ignore[operator]
                found.append(f"{path.relative_to(REPO_ROOT)} imports {name}")
    return found


def top(name: str) -> str:
    return name.split(".")[0]


def test_runtime_never_imports_the_operator_or_kopf() -> None:
    assert offending("runtime", lambda n: not n.startswith("kubetune.operator") and top(n) != "kopf") == []


def test_operator_never_imports_the_training_stack() -> None:
    assert offending("operator", lambda n: top(n) not in TRAINING_STACK) == []


# The layers of the operator that are pure (no I/O, no kopf, no API client), and the kind-agnostic core.
PURE_LAYERS = ["operator/builders", "operator/planning", "operator/status"]
KIND_LAYERS = ("api", "builders", "planning", "status", "reconcile", "handlers")


@pytest.mark.parametrize("folder", PURE_LAYERS)
def test_builders_planning_and_status_are_pure(folder: str) -> None:
    impure = tuple(f"kubetune.operator.{name}" for name in ("kube", "core", "handlers", "reconcile", "main"))
    clients = ("kopf", "kubernetes", "urllib3")
    assert offending(folder, lambda n: top(n) not in clients and not n.startswith(impure)) == []


def test_the_controller_core_knows_no_kind_and_no_kopf() -> None:
    kinds = tuple(f"kubetune.operator.{layer}" for layer in KIND_LAYERS)
    assert offending("operator/core", lambda n: top(n) != "kopf" and not n.startswith(kinds)) == []


def test_only_kube_and_its_connections_talk_to_the_api_server() -> None:
    clients = {"kubernetes", "urllib3", "http.client", "aiohttp", "kopf"}
    talkers = {"operator/kube/__init__.py", "operator/kube/transport.py", "operator/main.py"}  # main: kopf's login
    allowed_kopf = {str(path.relative_to(REPO_ROOT)) for path in sources("operator/handlers")}  # kopf's decorators
    found = [
        f"{path.relative_to(REPO_ROOT)} imports {name}"
        for path in sources("operator")
        for name in imports_of(path)
        if (name in clients or top(name) in clients)
        and str(path.relative_to(REPO_ROOT)) not in talkers
        and not (top(name) == "kopf" and str(path.relative_to(REPO_ROOT)) in allowed_kopf)
    ]
    assert found == []


def test_the_connections_are_reached_only_through_kube() -> None:
    # Everything else (the informer's watch included) goes through `Kube`, the one way to the API server.
    internal = "kubetune.operator.kube."
    found = [
        f"{path.relative_to(REPO_ROOT)} imports {name}"
        for folder in ("operator", "runtime", "cli")
        for path in sources(folder)
        for name in imports_of(path)
        if name.startswith(internal) and not path.is_relative_to(REPO_ROOT / "operator" / "kube")
    ]
    assert found == []


# The API models check a schedule with croniter, the library that later computes its times.
@pytest.mark.parametrize(
    ("folder", "libraries"), [("runtime/contract", {"pydantic"}), ("operator/api", {"pydantic", "croniter"})]
)
def test_api_models_import_only_pydantic_stdlib_and_the_contract(folder: str, libraries: set[str]) -> None:
    def allowed(name: str) -> bool:
        return (
            top(name) in STDLIB
            or top(name) in libraries
            or name.startswith(("kubetune.runtime.contract", "kubetune.operator.api"))
        )

    assert offending(folder, allowed) == []


def test_the_check_sees_imports() -> None:
    """The scanner resolves relative imports, so the checks above cannot pass vacuously."""
    names = set(imports_of(REPO_ROOT / "operator" / "api" / "finetunejob.py"))
    assert {"kubetune.operator.api.common", "kubetune.runtime.contract", "pydantic"} <= names


def test_importing_the_operator_loads_no_training_stack() -> None:
    modules = [module_name(p) for p in sources("operator") if p.name != "__main__.py"]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted(set({sorted(TRAINING_STACK)!r}) & {{n.split('.')[0] for n in sys.modules}}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_operator_resolves_to_the_standard_library() -> None:
    import operator

    assert Path(operator.__file__).parent == Path(sysconfig.get_paths()["stdlib"])
    assert operator.itemgetter(1)([0, 1]) == 1


def test_operator_from_the_repository_root_is_the_standard_library() -> None:
    """`python -c` from the root puts the root on sys.path first; the stdlib must still win."""
    code = "import operator, kubetune.operator.api as api; print(operator.__file__); print(api.__file__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    stdlib_file, api_file = result.stdout.split()
    assert Path(stdlib_file).parent == Path(sysconfig.get_paths()["stdlib"])
    assert Path(api_file).resolve() == REPO_ROOT / "operator" / "api" / "__init__.py"


def test_top_level_folders_are_not_packages() -> None:
    """An `__init__.py` here would make the folder shadow the stdlib module of the same name."""
    for folder in FOLDERS:
        assert not (REPO_ROOT / folder / "__init__.py").exists(), folder


def test_pyproject_lists_every_package() -> None:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {v: k for k, v in FOLDERS.items()}
    packages = {module_name(p) for folder in FOLDERS for p in (REPO_ROOT / folder).rglob("__init__.py")}
    packages |= set(FOLDERS.values())
    assert set(config["packages"]) == packages
