"""What a Dockerfile declares, read as BuildKit reads it, so that assembled images follow their Dockerfile.

Handles what kubetune's Dockerfiles use: parser directives and comments, line continuations (with
comment lines inside them dropped), global and per-stage ARG with build-argument overrides, FROM ...
AS (and FROM an earlier stage that only names an image), ENV and LABEL (key=value pairs with quotes,
and the legacy `ENV key value`), USER, WORKDIR, EXPOSE, ENTRYPOINT and CMD (exec form, or shell form
through the stage's shell), and RUN with its `--mount=type=bind,...` flags. Variables (`$NAME`,
`${NAME}`, `${NAME:-default}`, `${NAME:+alt}`) are expanded where Docker expands them; RUN text is
left to the shell, which gets the ARGs as environment variables.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

DEFAULT_SHELL = ("/bin/sh", "-c")
_CONTINUATION = re.compile(r"\\[ \t]*$")
_VARIABLE = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<op>[-+])(?P<word>[^}]*))?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class DockerfileError(ValueError):
    """A Dockerfile line this parser does not understand; the message names the line."""


@dataclass(frozen=True)
class Mount:
    """A RUN instruction's `--mount` flag."""

    type: str
    target: str
    source: str = "/"
    from_stage: str | None = None


@dataclass(frozen=True)
class Run:
    """A RUN instruction: its shell text, and the USER and environment it runs with."""

    command: str
    user: str | None
    # The ARGs in scope and the stage's own ENV so far; a base image's ENV comes between the two.
    args: tuple[tuple[str, str], ...]
    env: tuple[tuple[str, str], ...]
    shell: tuple[str, ...] | None
    workdir: str | None
    mounts: tuple[Mount, ...] = ()


@dataclass
class Stage:
    """One build stage: what its instructions declare on top of its base image."""

    base: str
    name: str | None
    # The base image's ENV, for expanding $NAME in this stage's instructions.
    inherited: dict[str, str] = field(default_factory=dict)
    args: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    workdir: str | None = None
    exposed_ports: list[str] = field(default_factory=list)
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    shell: list[str] | None = None
    runs: list[Run] = field(default_factory=list)
    # COPY and ADD sources: files the stage puts into its image.
    copies: list[str] = field(default_factory=list)


def expand(text: str, variables: Mapping[str, str]) -> str:
    """Expand Docker's variable forms in `text` (unknown names expand to nothing, as in Docker)."""

    def replace(match: re.Match[str]) -> str:
        name = match["braced"] or match["bare"]
        value = variables.get(name)
        if match["op"] == "-":
            return value if value else match["word"]
        if match["op"] == "+":
            return match["word"] if value else ""
        return value or ""

    return _VARIABLE.sub(replace, text)


def words(text: str, variables: Mapping[str, str]) -> list[str]:
    """Split on unquoted whitespace; quotes are removed, variables expanded except in single quotes."""
    result: list[str] = []
    current: list[str] = []
    started = False
    index = 0
    while index < len(text):
        char = text[index]
        if char.isspace():
            if started:
                result.append("".join(current))
                current, started = [], False
            index += 1
            continue
        started = True
        if char == "'":
            end = text.find("'", index + 1)
            if end < 0:
                raise DockerfileError(f"unterminated quote in {text!r}")
            current.append(text[index + 1 : end])
            index = end + 1
        elif char == '"':
            index += 1
            piece: list[str] = []
            while index < len(text) and text[index] != '"':
                if text[index] == "\\" and index + 1 < len(text) and text[index + 1] in '"\\$':
                    index += 1
                piece.append(text[index])
                index += 1
            if index >= len(text):
                raise DockerfileError(f"unterminated quote in {text!r}")
            current.append(expand("".join(piece), variables))
            index += 1
        else:
            end = index
            while end < len(text) and not text[end].isspace() and text[end] not in "'\"":
                end += 1
            current.append(expand(text[index:end].replace("\\ ", " "), variables))
            index = end
    if started:
        result.append("".join(current))
    return result


def _pairs(arguments: str, variables: Mapping[str, str], instruction: str) -> list[tuple[str, str]]:
    tokens = words(arguments, variables)
    if tokens and "=" not in tokens[0]:
        # The legacy form: `ENV NAME value with spaces`.
        return [(tokens[0], " ".join(tokens[1:]))]
    pairs = []
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise DockerfileError(f"{instruction} expects key=value pairs, got {token!r}")
        pairs.append((key, value))
    return pairs


def _instructions(text: str) -> list[tuple[int, str, str]]:
    """(line number, KEYWORD, arguments) per instruction, with continuations joined as BuildKit joins them.

    A continuation drops its trailing backslash and keeps the next line as written (leading blanks
    included); comment lines and empty lines inside a continuation are skipped.
    """
    result: list[tuple[int, str, str]] = []
    joined: str | None = None
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if joined is None:
            start, joined = number, ""
            raw = raw.lstrip()
        continued = _CONTINUATION.search(raw)
        joined += raw[: continued.start()] if continued else raw
        if continued:
            continue
        keyword, _, arguments = joined.strip().partition(" ")
        result.append((start, keyword.upper(), arguments.strip()))
        joined = None
    if joined is not None:
        raise DockerfileError(f"line {start}: the last instruction ends in a line continuation")
    return result


def _run_flags(arguments: str) -> tuple[str, tuple[Mount, ...]]:
    mounts = []
    while arguments.startswith("--"):
        flag, _, arguments = arguments.partition(" ")
        arguments = arguments.lstrip()
        name, _, value = flag[2:].partition("=")
        if name != "mount":
            raise DockerfileError(f"RUN flag {flag!r} is not supported")
        options = dict(option.partition("=")[::2] for option in value.split(","))
        if options.get("type", "bind") != "bind" or "target" not in options:
            raise DockerfileError(f"RUN mount {value!r}: only bind mounts with a target are supported")
        mounts.append(
            Mount(
                type="bind", target=options["target"], source=options.get("source", "/"), from_stage=options.get("from")
            )
        )
    return arguments, tuple(mounts)


def _aliased(reference: str, stages: list[Stage], where: str) -> str:
    """The image a FROM names: an earlier stage that only names an image (`FROM image AS alias`) stands
    for that image; a stage with instructions of its own cannot be a base here."""
    earlier = next((stage for stage in reversed(stages) if stage.name == reference), None)
    if earlier is None:
        return reference
    if earlier != Stage(base=earlier.base, name=earlier.name, inherited=earlier.inherited):
        raise DockerfileError(f"{where}: FROM {reference}: only a stage without instructions can be a base")
    return earlier.base


def parse(
    text: str,
    build_args: Mapping[str, str] | None = None,
    base_env: Callable[[str], Mapping[str, str]] | None = None,
) -> list[Stage]:
    """The stages of a Dockerfile, with `build_args` (like --build-arg) overriding ARG defaults.

    `base_env(image)` gives a base image's ENV, which `$NAME` in a stage's ENV, LABEL, USER,
    WORKDIR and EXPOSE may refer to (e.g. `ENV PATH=/opt/bin:$PATH`).
    """
    overrides = dict(build_args or {})
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, keyword, arguments in _instructions(text):
        where = f"line {number}"
        if keyword == "FROM":
            parts = words(arguments, global_args)
            if len(parts) not in (1, 3) or (len(parts) == 3 and parts[1].upper() != "AS"):
                raise DockerfileError(f"{where}: FROM {arguments!r}")
            base = _aliased(parts[0], stages, where)
            inherited = dict(base_env(base)) if base_env else {}
            stages.append(Stage(base=base, name=parts[2] if len(parts) == 3 else None, inherited=inherited))
            continue
        if keyword == "ARG":
            scope = stages[-1].args if stages else global_args
            # One or more `NAME[=default]`; a default may use the ARGs before it.
            for token in words(arguments, {**global_args, **scope} if stages else global_args):
                name, has_default, default = token.partition("=")
                if name in overrides:
                    scope[name] = overrides[name]
                elif has_default:
                    scope[name] = default
                elif stages and name in global_args:
                    scope[name] = global_args[name]
            continue
        if not stages:
            raise DockerfileError(f"{where}: {keyword} before the first FROM")
        stage = stages[-1]
        variables = {**stage.args, **stage.inherited, **stage.env}
        if keyword == "ENV":
            stage.env.update(_pairs(arguments, variables, keyword))
        elif keyword == "LABEL":
            stage.labels.update(_pairs(arguments, variables, keyword))
        elif keyword == "USER":
            stage.user = expand(arguments, variables)
        elif keyword == "WORKDIR":
            stage.workdir = expand(arguments, variables)
        elif keyword == "EXPOSE":
            stage.exposed_ports += [port if "/" in port else f"{port}/tcp" for port in words(arguments, variables)]
        elif keyword in ("ENTRYPOINT", "CMD"):
            form = json.loads(arguments) if arguments.startswith("[") else [*(stage.shell or DEFAULT_SHELL), arguments]
            setattr(stage, keyword.lower(), form)
        elif keyword == "SHELL":
            stage.shell = json.loads(arguments)
        elif keyword in ("COPY", "ADD"):
            stage.copies.append(arguments)
        elif keyword == "RUN":
            command, mounts = _run_flags(arguments)
            shell = tuple(stage.shell) if stage.shell else None
            args, env = tuple(stage.args.items()), tuple(stage.env.items())
            run = Run(command, stage.user, args, env, shell, stage.workdir, mounts)
            stage.runs.append(run)
        elif keyword not in ("HEALTHCHECK", "STOPSIGNAL", "ONBUILD", "VOLUME"):
            raise DockerfileError(f"{where}: unknown instruction {keyword}")
    if not stages:
        raise DockerfileError("no FROM instruction")
    return stages
