"""Writes the configuration reference and the chart's settings env from the settings classes.

`python -m kubetune.operator.settingsgen DOCS_DIR CHART_DIR` writes DOCS_DIR/configuration.md
(every KUBETUNE_* variable: the operator's, the runtime's, and those of the scripts and tests)
and CHART_DIR/templates/_settings.tpl, the named template `kubetune.settingsEnv` that the
operator Deployment's env includes: one entry per setting that has a chart value under
`operator:` in values.yaml. Unit tests fail when either file drifts.
"""

from __future__ import annotations

import sys
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.operator.settings import ENV_PREFIX, OperatorSettings
from kubetune.runtime.io.settings import Faults, RuntimeSettings
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

DOCS_FILE = Path("configuration.md")
CHART_FILE = Path("templates") / "_settings.tpl"
TEMPLATE_NAME = "kubetune.settingsEnv"
COMMAND = "python -m kubetune.operator.settingsgen docs charts/kubetune"


@dataclass(frozen=True)
class Variable:
    """An environment variable the scripts or the tests read: no setting of kubetune itself."""

    name: str
    default: str
    description: str


# Knobs of scripts/ and tests/: install-script variables, and test variables under KUBETUNE_TEST_*.
DEVELOPMENT_VARIABLES = (
    Variable("KUBETUNE_VENV", "<repository>/.venv", "The virtual environment scripts/env.sh creates and uses."),
    Variable(
        "KUBETUNE_EXTRAS",
        "dev,runtime,runtime-test",
        "The extras scripts/env.sh installs kubetune with (all that the test suite needs by default).",
    ),
    Variable(
        "KUBETUNE_TEST_KUBECONFIG",
        "",
        "Run the integration tests against this existing cluster and start no local control plane.",
    ),
    Variable(
        "KUBETUNE_TEST_CACHE_DIR",
        "$XDG_CACHE_HOME/kubetune",
        "Cache of the test control plane's binaries and of the images the tests assemble.",
    ),
    Variable(
        "KUBETUNE_TEST_DEBIAN_MIRROR",
        "http://deb.debian.org/debian",
        "Debian mirror of the tests' image builder.",
    ),
    Variable(
        "KUBETUNE_TEST_DEBIAN_SECURITY_MIRROR",
        "http://deb.debian.org/debian-security",
        "Debian security mirror of the tests' image builder.",
    ),
    Variable(
        "KUBETUNE_TEST_FULL_INSTALL",
        "",
        "1: the wheel install test installs the gpu image's lock from the index, as the image build does.",
    ),
)

INTRODUCTION = """\
# Configuration

kubetune reads its settings from `KUBETUNE_*` environment variables. An unset or empty variable keeps the
default; a value a setting cannot take stops the process with an error that names the variable.
This page is generated from the settings classes (`operator/settings.py`, `runtime/io/settings.py`) by
`{command}`; a unit test fails when it drifts.

What the runtime image fixes (its user and group 1000:100, its cache folder /home/ray/.cache) and where
the operator mounts volumes in its pods are constants (`operator/images.py`), not settings.
"""


def variable(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _extra(field: FieldInfo) -> dict[str, Any]:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def _type(annotation: Any) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type(arm) for arm in typing.get_args(annotation) if arm is not type(None))
    if typing.get_origin(annotation) is typing.Annotated:
        return _type(typing.get_args(annotation)[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "name=value list"
    names = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _default(field: FieldInfo) -> str:
    shown = _extra(field).get("shown_default")
    if shown is not None:
        return str(shown)
    value = field.get_default(call_default_factory=True)
    if isinstance(value, bool):
        return str(value).lower()
    if value is None or value == "" or (isinstance(value, BaseModel) and not value.model_dump(exclude_none=True)):
        return "(none)"
    return str(value)


def _constraints(field: FieldInfo) -> str:
    words = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    found = [f"{words[name]} {getattr(item, name)}" for item in field.metadata for name in words if hasattr(item, name)]
    return f" Must be {', '.join(found)}." if found else ""


def _cell(text: str) -> str:
    """Table cell text: Markdown's own characters escaped outside code spans."""
    parts = text.replace("|", "\\|").replace("\n", " ").split("`")
    for index in range(0, len(parts), 2):
        parts[index] = parts[index].replace("*", "\\*").replace("<", "&lt;")
    return "`".join(parts)


def _code(text: str) -> str:
    return f"`{text}`" if text and not text.startswith("(") else text


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _settings_rows(settings: type[BaseSettings], chart: bool) -> list[list[str]]:
    rows = []
    for name, field in settings.model_fields.items():
        row = [f"`{variable(name)}`", _type(field.annotation), _code(_default(field))]
        if chart:
            key = _extra(field).get("chart_value")
            row.append(f"`operator.{key}`" if key else "")
        row.append((field.description or "") + _constraints(field))
        rows.append(row)
    return rows


def render_docs() -> str:
    """The text of docs/configuration.md."""
    faults = [
        [f"`{name}`", _type(field.annotation), (field.description or "") + _constraints(field)]
        for name, field in Faults.model_fields.items()
    ]
    development = [
        [f"`{item.name}`", _code(item.default) or "(none)", item.description] for item in DEVELOPMENT_VARIABLES
    ]
    return "\n".join(
        [
            INTRODUCTION.format(command=COMMAND),
            "## Operator\n\nThe operator's process reads these (the Helm chart sets those with a chart value from "
            "`values.yaml`). Lists are comma-separated; labels are comma-separated `key=value` pairs.\n",
            _table(
                ["Variable", "Type", "Default", "Chart value", "Description"], _settings_rows(OperatorSettings, True)
            ),
            "## Runtime\n\nThe runtime reads these in a run's and an endpoint's Ray pods (where the operator sets "
            "`KUBETUNE_PVC_ROOT` and `KUBETUNE_RUN_CONFIG`) and in local runs (`kubetune run`, `kubetune serve`).\n",
            _table(["Variable", "Type", "Default", "Description"], _settings_rows(RuntimeSettings, False)),
            f"The names `{variable('faults')}` takes, e.g. `{variable('faults')}=train_step=6`:\n",
            _table(["Name", "Type", "Description"], faults),
            "## Scripts and tests\n\nDevelopment only: the scripts in `scripts/` and the test suite read these.\n",
            _table(["Variable", "Default", "Description"], development),
        ]
    )


def chart_settings() -> list[tuple[str, str, FieldInfo]]:
    """(variable, chart value path under `operator:`, field) of each setting the chart passes."""
    return [
        (variable(name), str(_extra(field)["chart_value"]), field)
        for name, field in OperatorSettings.model_fields.items()
        if "chart_value" in _extra(field)
    ]


def _chart_entry(name: str, key: str, field: FieldInfo) -> str:
    path = " ".join(f'"{part}"' for part in key.split("."))
    # Lists join with commas, label maps become key=value pairs; integers stay integers (helm reads
    # numbers as floats, and a float prints as 1e+06).
    if field.annotation is int:
        value = "{{ $value | int64 | quote }}"
    else:
        value = (
            '{{ if kindIs "slice" $value }}{{ join "," $value | quote }}'
            '{{ else if kindIs "map" $value }}{{ include "kubetune.labelList" $value | quote }}'
            "{{ else }}{{ $value | quote }}{{ end }}"
        )
    return (
        f"{{{{- $value := dig {path} nil $settings }}}}\n"
        '{{- if or (kindIs "bool" $value) (kindIs "float64" $value) (kindIs "int64" $value) $value }}\n'
        f"- name: {name}\n"
        f"  value: {value}\n"
        "{{- end }}\n"
    )


def render_chart() -> str:
    """The text of templates/_settings.tpl: the env entries of `.Values.operator`'s settings."""
    entries = "".join(_chart_entry(name, key, field) for name, key, field in chart_settings())
    return (
        "{{/* Generated from kubetune's operator/settings.py by "
        f"`{COMMAND}`. Do not edit. */}}}}\n"
        "{{/* The operator's env from .Values.operator (the context): a setting left unset or empty keeps its "
        "default. */}}\n"
        f'{{{{- define "{TEMPLATE_NAME}" -}}}}\n'
        "{{- $settings := . }}\n"
        f"{entries}"
        "{{- end }}\n"
    )


def write(docs: Path, chart: Path) -> list[Path]:
    written = []
    for path, text in ((docs / DOCS_FILE, render_docs()), (chart / CHART_FILE, render_chart())):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m kubetune.operator.settingsgen DOCS_DIR CHART_DIR", file=sys.stderr)
        return 2
    for path in write(Path(args[0]), Path(args[1])):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
