"""Load a base model and its tokenizer, and shape it for the fine-tuning method of the spec.

Methods: full (every weight trains), lora / dora (peft adapters; the head trains too),
freeze (only the top layers and the head train) and qlora (a 4-bit base with LoRA
adapters, CUDA only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .contract import Method, MethodType, ModelSource, Task
from .contract.report import Unavailable
from .data.hub import hub_setup, is_unavailable, local_files_only, unreachable_message
from .data.plan_sources import TOKENIZER_FILES
from .data.task_ops import auto_class
from .io.errors import ModelError, ModelUnavailableError
from .io.settings import RuntimeSettings
from .io.storage import download_s3_files, fetch, parse_uri

# Attention projections adapted by default, per `config.model_type`, for types peft's own
# table lacks; every other type falls back to peft's table. Named as transformers 5 names them
# (its ViT and DeiT layers call them q_proj and v_proj).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "camembert": ["query", "value"],
    "mpnet": ["q", "v"],
    "distilbert": ["q_lin", "v_lin"],
    "albert": ["query", "value"],
    "vit": ["q_proj", "v_proj"],
    "deit": ["q_proj", "v_proj"],
}


@dataclass(frozen=True)
class ModelLocation:
    """Where `from_pretrained` loads from: a local folder or a hub repository id."""

    source: str
    revision: str | None = None
    from_hub: bool = False
    # A hub model that loads from the Hugging Face cache alone (offline, or the hub does not answer).
    cache_only: bool = False


def locate_model(model: ModelSource, settings: RuntimeSettings) -> ModelLocation:
    """Resolve the model URI to a local folder (downloading s3:// first) or a hub repository.

    For a hub repository, ModelUnavailableError when neither the hub nor the cache can deliver it now.
    """
    parsed = parse_uri(model.uri)
    if parsed.scheme == "hf":
        cache_only = local_files_only(parsed.location, model.revision, model.uri)
        return ModelLocation(parsed.location, model.revision, from_hub=True, cache_only=cache_only)
    path = fetch(model.uri, settings)
    if not (Path(path) / "config.json").is_file():
        raise ModelError("model.uri", f"{model.uri} is not a Hugging Face model folder (no config.json)")
    return ModelLocation(str(path))


def tokenizer_location(model: ModelSource, settings: RuntimeSettings) -> ModelLocation:
    """Where the model's tokenizer loads from, without its weights: of an s3:// model only the tokenizer's files
    are copied (a hub model's tokenizer files are all `from_pretrained` fetches)."""
    if parse_uri(model.uri).scheme == "s3":
        return ModelLocation(str(download_s3_files(model.uri, TOKENIZER_FILES, settings)))
    return locate_model(model, settings)


def _pretrained_kwargs(location: ModelLocation, model: ModelSource) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"revision": location.revision, "trust_remote_code": model.trust_remote_code}
    if location.cache_only:
        kwargs["local_files_only"] = True
    return kwargs


def _load_error(location: ModelLocation, model: ModelSource, problem: str, error: Exception) -> Exception:
    """What a failed `from_pretrained` means: a hub that cannot deliver now, or a model that cannot load.

    Anything else (not an OSError or ValueError, nor a hub's failure) is raised as it is.
    """
    if location.from_hub and is_unavailable(error):
        reason = f"{problem}: {type(error).__name__}: {error}"
        return ModelUnavailableError(
            Unavailable.MODEL_HUB, "model.uri", unreachable_message(model.uri, hub_setup(), reason)
        )
    if isinstance(error, (OSError, ValueError)):
        return ModelError("model.uri", f"{problem}: {error}")
    return error


def load_processor(location: ModelLocation, model: ModelSource) -> Any:
    """The tokenizer (text tasks) or the image processor (image classification) of the model."""
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        if model.task == Task.IMAGE_CLASSIFICATION:
            return AutoImageProcessor.from_pretrained(  # type: ignore[no-untyped-call]
                location.source, **_pretrained_kwargs(location, model)
            )
        tokenizer = AutoTokenizer.from_pretrained(location.source, **_pretrained_kwargs(location, model))
    except Exception as error:
        failure = _load_error(location, model, f"cannot load the tokenizer or processor of {model.uri}", error)
        if failure is error:
            raise
        raise failure from None
    if model.task == Task.CAUSAL_LM and tokenizer.pad_token_id is None:
        # Padding is masked out of attention and loss; any known token serves.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(
    location: ModelLocation, model: ModelSource, labels: list[str], seed: int, extra: dict[str, Any] | None = None
) -> Any:
    """The base model with the task's head (for classification a seeded fresh head for `labels`)."""
    # The new head is initialised from the global RNG: seeding makes it the same on every worker.
    torch.manual_seed(seed)
    kwargs = {**_pretrained_kwargs(location, model), **(extra or {})}
    if location.cache_only:
        # The Auto classes look for a peft adapter config without passing local_files_only on: asking the
        # hub for it would retry for about 30 s.
        kwargs["adapter_kwargs"] = {"local_files_only": True}
    try:
        auto = auto_class(model.task)
        if model.task == Task.CAUSAL_LM:
            return auto.from_pretrained(location.source, **kwargs)
        return auto.from_pretrained(
            location.source,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            # A pretrained head with another label count is replaced, not an error.
            ignore_mismatched_sizes=True,
            **kwargs,
        )
    except Exception as error:
        failure = _load_error(location, model, f"cannot load {model.uri} for {model.task.value}", error)
        if failure is error:
            raise
        raise failure from None


def check_method_fits_machine(method: Method, use_gpu: bool) -> None:
    """Refuse, before anything loads, a method this machine cannot run."""
    if method.type == MethodType.QLORA and not (use_gpu and torch.cuda.is_available()):
        raise ModelError("method.type", "qlora needs a CUDA GPU; use lora on CPU")


def quantized_base_kwargs(method: Method) -> dict[str, Any]:
    """from_pretrained arguments that load the frozen base in 4 bits (qlora only)."""
    if method.type != MethodType.QLORA:
        return {}
    try:
        from transformers import BitsAndBytesConfig
    except ImportError as error:
        raise ModelError("method.type", f"qlora needs bitsandbytes: {error}") from None
    options = method.qlora_options
    config = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type=options.quant_type,
        bnb_4bit_use_double_quant=options.double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return {"quantization_config": config}


def _lora_targets(model: nn.Module, method: Method) -> list[str] | None:
    options = method.lora_options
    if options.target_modules is not None:
        return list(options.target_modules)
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    return DEFAULT_TARGET_MODULES.get(model_type)


def _with_adapters(model: nn.Module, method: Method, task: Task) -> nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    options = method.lora_options
    if method.type == MethodType.QLORA:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)  # type: ignore[no-untyped-call]
    # peft has no image-classification task type: the classifier head is kept trainable by name instead.
    task_type = {Task.TEXT_CLASSIFICATION: TaskType.SEQ_CLS, Task.CAUSAL_LM: TaskType.CAUSAL_LM}.get(task)
    config = LoraConfig(
        task_type=task_type,
        modules_to_save=["classifier"] if task == Task.IMAGE_CLASSIFICATION else None,
        r=options.rank,
        # peft scales by lora_alpha / r as floats; its annotation says int.
        lora_alpha=options.alpha,  # type: ignore[arg-type]
        lora_dropout=options.dropout,
        target_modules=_lora_targets(model, method),
        use_dora=method.type == MethodType.DORA,
    )
    try:
        adapted: nn.Module = get_peft_model(model, config)
    except ValueError as error:
        raise ModelError("method.lora.targetModules", str(error)) from None
    return adapted


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the longest ModuleList in the model."""
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not stacks:
        raise ModelError("method.type", f"freeze: found no layer stack in {type(model).__name__}")
    return max(stacks, key=len)


def _freeze_all_but_top(model: nn.Module, trainable_layers: int) -> nn.Module:
    base_prefix = getattr(model, "base_model_prefix", "")
    layers = transformer_layers(model)
    for parameter in model.parameters():
        parameter.requires_grad = False
    for layer in list(layers)[len(layers) - trainable_layers :] if trainable_layers else []:
        layer.requires_grad_(True)
    for name, module in model.named_children():
        # Everything outside the backbone is the head (classifier, pre_classifier, score, ...).
        if name != base_prefix:
            module.requires_grad_(True)
    for name, module in model.named_modules():
        # The pooler only feeds the head, so it is part of what the head learns.
        if name.endswith("pooler"):
            module.requires_grad_(True)
    return model


def apply_method(model: nn.Module, method: Method, task: Task = Task.TEXT_CLASSIFICATION) -> nn.Module:
    """Make exactly the parameters the method trains require gradients."""
    if method.type == MethodType.FULL:
        return model
    if method.type == MethodType.FREEZE:
        return _freeze_all_but_top(model, method.freeze_options.trainable_layers)
    return _with_adapters(model, method, task)


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def build_model(
    model: ModelSource, method: Method, labels: list[str], seed: int, settings: RuntimeSettings
) -> tuple[nn.Module, Any]:
    """Base model with the method applied, and its tokenizer or image processor."""
    location = locate_model(model, settings)
    processor = load_processor(location, model)
    base = load_base(location, model, labels, seed, quantized_base_kwargs(method))
    pad_token_id = getattr(processor, "pad_token_id", None)
    if getattr(base.config, "pad_token_id", 0) is None and pad_token_id is not None:
        base.config.pad_token_id = pad_token_id
    return apply_method(base, method, model.task), processor
