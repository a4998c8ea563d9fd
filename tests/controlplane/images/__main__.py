"""Command line: `python tests/controlplane/images build [NAME ...]` (NAME: pause, operator, runtime,
runtime-minilm; default all) builds or finds the images and prints one JSON object on stdout,
{"<name>": {"reference": "<image reference>", "archive": "<path of the OCI archive>"}, ...};
progress goes to stderr. Exit status 2 when this machine cannot build images, 1 when a step fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path


def _load_package() -> None:
    """Import this folder as tests.controlplane.images when it runs as a file, without putting the
    repository root on sys.path (its `operator/` folder would shadow the standard library)."""
    here = Path(__file__).resolve().parent
    if sys.path and Path(sys.path[0]).resolve() == here:
        del sys.path[0]  # this folder's modules are not top-level modules
    for name, folder in (
        ("tests", here.parents[1]),
        ("tests.controlplane", here.parent),
        ("tests.controlplane.images", here),
    ):
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(
                name, folder / "__init__.py", submodule_search_locations=[str(folder)]
            )
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)


def main(argv: list[str] | None = None) -> int:
    if not __package__:
        _load_package()
    from tests.controlplane.images import IMAGE_NAMES, BuildStepError, ImagesUnavailableError, build_images

    parser = argparse.ArgumentParser(prog="python tests/controlplane/images", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build (or find in the cache) images and print their references")
    build.add_argument("names", nargs="*", metavar="NAME", help=f"one of {', '.join(IMAGE_NAMES)} (default: all)")
    arguments = parser.parse_args(argv)
    unknown = sorted(set(arguments.names) - set(IMAGE_NAMES))
    if unknown:
        parser.error(f"unknown images {', '.join(unknown)}; known: {', '.join(IMAGE_NAMES)}")
    try:
        images = build_images(tuple(arguments.names) or IMAGE_NAMES)
    except ImagesUnavailableError as error:
        print(f"cannot build images here: {error}", file=sys.stderr)
        return 2
    except BuildStepError as error:
        print(f"image build failed: {error}", file=sys.stderr)
        return 1
    print(
        json.dumps({name: {"reference": image.name, "archive": str(image.archive)} for name, image in images.items()})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
