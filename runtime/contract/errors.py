"""Turn pydantic validation errors into messages that name the offending field."""

from __future__ import annotations

from pydantic import ValidationError

_PREFIXES = ("Value error, ", "Assertion failed, ")


def field_path(location: tuple[int | str, ...], root: str = "") -> str:
    """`('spec', 'runs', 0, 'name')` → `spec.runs[0].name`."""
    path = root
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else str(part)
    return path or "(root)"


def describe(error: ValidationError, root: str = "") -> list[str]:
    """One line per problem: `<field path>: <message>`."""
    lines = []
    for item in error.errors(include_url=False):
        message = str(item["msg"])
        for prefix in _PREFIXES:
            message = message.removeprefix(prefix)
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        elif item["type"] == "missing":
            message = "required field is missing"
        lines.append(f"{field_path(tuple(item['loc']), root)}: {message}")
    return lines


class SpecError(ValueError):
    """A spec that can never work; the message names every offending field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))

    @classmethod
    def from_validation(cls, error: ValidationError, root: str = "") -> SpecError:
        return cls(describe(error, root))
