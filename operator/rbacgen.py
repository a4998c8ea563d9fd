"""Writes the chart's RBAC rules from `permissions.py`: `python -m kubetune.operator.rbacgen CHART_DIR`.

The rules become one named template per `Scope` (`kubetune.rules.namespaced`,
`kubetune.rules.cluster`, `kubetune.rules.operatorNamespace`) in `templates/_rules.tpl`, each
rule under a comment giving its reason, so a rendered Role or ClusterRole says why it holds
every verb. A unit test fails when the file drifts.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

from kubetune.operator.permissions import PERMISSIONS, Permission, Scope

FILE = Path("templates") / "_rules.tpl"
HEADER = (
    "{{/* Generated from kubetune's operator/permissions.py by "
    "`python -m kubetune.operator.rbacgen charts/kubetune`. Do not edit. */}}\n"
)
TEMPLATE_NAMES = {
    Scope.NAMESPACED: "kubetune.rules.namespaced",
    Scope.CLUSTER: "kubetune.rules.cluster",
    Scope.OPERATOR_NAMESPACE: "kubetune.rules.operatorNamespace",
}


def _rule(permission: Permission) -> str:
    rule = permission.rule()
    comment = textwrap.wrap(permission.why, width=100, initial_indent="# ", subsequent_indent="# ")
    body = [
        f"- apiGroups: {json.dumps(rule['apiGroups'])}",
        f"  resources: {json.dumps(rule['resources'])}",
        f"  verbs: {json.dumps(rule['verbs'])}",
    ]
    return "\n".join([*comment, *body])


def rendered() -> str:
    """The text of `templates/_rules.tpl`."""
    parts = [HEADER]
    for scope, name in TEMPLATE_NAMES.items():
        rules = "\n".join(_rule(p) for p in PERMISSIONS if p.scope == scope)
        parts.append(f'{{{{- define "{name}" -}}}}\n{rules}\n{{{{- end }}}}\n')
    return "".join(parts)


def write(chart: Path) -> Path:
    path = chart / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(rendered())
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m kubetune.operator.rbacgen CHART_DIR", file=sys.stderr)
        return 2
    print(f"wrote {write(Path(args[0]))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
