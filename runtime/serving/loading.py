"""What a serving replica serves: an exported variant, found, loaded through the runtime's loader, warmed up.

`model_uri` is a variant's Hugging Face folder, or a run's output folder with
kubetune.json, whose variant is chosen by name (`best`: the run's own choice). The
task comes from the arguments, the manifest, or the model's config, in that order.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from kubetune.runtime.contract import Task
from kubetune.runtime.contract.manifest import ArtifactManifest
from kubetune.runtime.contract.serving import ServeAppArgs, Variant
from kubetune.runtime.io.errors import ModelError
from kubetune.runtime.io.settings import RuntimeSettings
from kubetune.runtime.io.storage import fetch
from kubetune.runtime.variants.load import load_variant
from torch import nn

LOGGER = logging.getLogger(__name__)
# Suffixes of transformers' architecture names, per task.
_ARCHITECTURES = {
    "ForSequenceClassification": Task.TEXT_CLASSIFICATION,
    "ForImageClassification": Task.IMAGE_CLASSIFICATION,
    "ForCausalLM": Task.CAUSAL_LM,
}
# Texts longer than this many tokens are cut (the model's own limit when it is lower).
MAX_TEXT_TOKENS = 512


@dataclass
class Loaded:
    """A model ready to answer: the module, its tokenizer or image processor, and what it is."""

    name: str
    task: Task
    model: nn.Module
    processor: Any
    labels: list[str]  # class names in label-id order (classifiers)
    folder: Path
    max_length: int  # tokens of one input (text tasks)


def served_folder(root: Path, variant: Variant) -> tuple[Path, ArtifactManifest | None]:
    """The folder to load and the run's manifest, when `root` is a run's output (else `root` itself)."""
    manifest = ArtifactManifest.load(root)
    if manifest is None:
        return root, None
    name = manifest.best_variant if variant == Variant.BEST else variant.value
    if not name or name not in manifest.variants:
        known = ", ".join(sorted(manifest.variants)) or "none"
        raise ModelError("variant", f"the run at {root} has no variant {name or variant.value!r} (it has {known})")
    return root / manifest.folder_of(name), manifest


def detect_task(folder: Path, manifest: ArtifactManifest | None) -> Task:
    if manifest and manifest.task:
        return manifest.task
    config = _config(folder)
    for architecture in config.get("architectures") or []:
        for suffix, task in _ARCHITECTURES.items():
            if str(architecture).endswith(suffix):
                return task
    raise ModelError("task", f"cannot tell the task of the model in {folder}: set it explicitly")


def _config(folder: Path) -> dict[str, Any]:
    for name in ("config.json", "adapter_config.json"):
        if (folder / name).is_file():
            config: dict[str, Any] = json.loads((folder / name).read_text(encoding="utf-8"))
            return config
    raise ModelError("modelUri", f"{folder} is not a Hugging Face model folder (no config.json)")


def load_processor(folder: Path, task: Task) -> Any:
    from transformers import AutoImageProcessor, AutoTokenizer

    if task == Task.IMAGE_CLASSIFICATION:
        return AutoImageProcessor.from_pretrained(folder)  # type: ignore[no-untyped-call]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if task == Task.CAUSAL_LM:
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # a batch of prompts ends where generation starts
    return tokenizer


def load(args: ServeAppArgs, settings: RuntimeSettings) -> Loaded:
    """The model `args` name, loaded (downloading s3:// first), compiled when asked, and warmed up."""
    root = fetch(args.model_uri, settings)
    folder, manifest = served_folder(root, args.variant)
    task = args.task or detect_task(folder, manifest)
    model = load_variant(folder, task)
    processor = load_processor(folder, task)
    config = getattr(model, "config", None)
    labels = [str(label) for _, label in sorted((getattr(config, "id2label", None) or {}).items())]
    positions = int(getattr(config, "max_position_embeddings", 0) or MAX_TEXT_TOKENS)
    loaded = Loaded(
        name=args.model_name or (manifest and manifest.run.job_name) or root.name,
        task=task,
        model=model,
        processor=processor,
        labels=labels if task != Task.CAUSAL_LM else [],
        folder=folder,
        max_length=min(positions, MAX_TEXT_TOKENS),
    )
    if args.compiles(task) and task != Task.CAUSAL_LM:  # generation's changing shapes would recompile all along
        _compile_and_warm_up(loaded, asked=args.compile is True)
    else:
        warm_up(loaded)
    LOGGER.info("serving %s (%s) from %s", loaded.name, task.value, folder)
    return loaded


def compiler_problem() -> str | None:
    """Why torch.compile cannot build CPU kernels here (no working C++ compiler); None when it can.

    The check is inductor's own (the compiler answers `--version`), done once per process.
    Ray's CPU images ship no compiler.
    """
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler as error:
        return str(error)
    return None


def _compile_and_warm_up(loaded: Loaded, *, asked: bool) -> None:
    """Compile the model and warm it up; eager, with a warning, when the compile was a default that cannot work.

    `asked`: the spec set compile: true, so a compile that cannot work fails the replica instead.
    """
    problem = compiler_problem()
    if problem is not None:
        if asked:
            raise ModelError(
                "compile",
                f"torch.compile needs a working C++ compiler (such as g++) in the image, and there is none "
                f"({problem}): install one, or set compile: false",
            )
        LOGGER.warning("serving %s eager, not compiled: %s (set compile: false to say so)", loaded.name, problem)
        warm_up(loaded)
        return
    from torch._dynamo.exc import TorchDynamoException

    eager = loaded.model
    # Dynamic shapes: one compile serves every batch size and length, none happens under load.
    loaded.model = torch.compile(eager, dynamic=True)  # type: ignore[assignment]
    try:
        warm_up(loaded)  # the compile happens here
    except TorchDynamoException as error:
        if asked:
            raise
        LOGGER.warning("serving %s eager, not compiled: torch.compile failed: %s", loaded.name, error)
        loaded.model = eager
        warm_up(loaded)


def warm_up(loaded: Loaded) -> None:
    """One answer of each kind before the replica takes requests (and, when compiled, the compile)."""
    from kubetune.runtime.serving import predict

    if loaded.task == Task.CAUSAL_LM:
        predict.complete(loaded, ["warm up"], predict.Sampling(max_tokens=2))
    elif loaded.task == Task.IMAGE_CLASSIFICATION:
        predict.classify(loaded, [predict.blank_image()])
    else:
        for size in (1, 2):  # compiled models specialise on the batch dimension once
            predict.classify(loaded, ["warm up"] * size)
