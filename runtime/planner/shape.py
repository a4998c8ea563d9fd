"""The shape of a model, read from its `config.json`, and its parameter counts by part.

Three architecture families cover the model types kubetune trains: BERT-like encoders
(post-norm, GELU MLP), Llama-like decoders (pre-norm RMSNorm, gated SiLU MLP, grouped-query
attention) and ViT image encoders (pre-norm, patch embedding). Counts follow the module
layout transformers builds for the runtime's Auto classes, so they equal what it allocates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from kubetune.runtime.contract import Task


class Family(StrEnum):
    ENCODER = "encoder"
    DECODER = "decoder"
    VISION = "vision"


FAMILY_OF_MODEL_TYPE: dict[str, Family] = {
    "bert": Family.ENCODER,
    "roberta": Family.ENCODER,
    "xlm-roberta": Family.ENCODER,
    "camembert": Family.ENCODER,
    "llama": Family.DECODER,
    "mistral": Family.DECODER,
    "qwen2": Family.DECODER,
    "vit": Family.VISION,
}
# RoBERTa-style sequence classifiers have no pooler but a two-layer head.
ROBERTA_HEADS = frozenset({"roberta", "xlm-roberta", "camembert"})
# Decoders whose q/k/v projections carry a bias.
_QKV_BIAS = frozenset({"qwen2"})
# peft's default adapter targets per model type (its own table, and the runtime's for the types it lacks).
DEFAULT_LORA_TARGETS: dict[Family, tuple[str, ...]] = {
    Family.ENCODER: ("query", "value"),
    Family.DECODER: ("q_proj", "v_proj"),
    Family.VISION: ("q_proj", "v_proj"),
}
DTYPE_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}


class ConfigError(ValueError):
    """A config.json the planner cannot read: names the missing or unsupported key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config.json {key}: {message}")
        self.key = key


@dataclass(frozen=True)
class Linear:
    """One nn.Linear of a layer: its name (what LoRA targets match), input and output widths, bias."""

    name: str
    inputs: int
    outputs: int
    bias: bool = True

    @property
    def parameters(self) -> int:
        return self.inputs * self.outputs + (self.outputs if self.bias else 0)


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model: sizes from config.json, no weights."""

    model_type: str
    family: Family
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    # Weights load in the checkpoint's dtype (transformers' default `dtype="auto"`).
    weight_bytes: int = 4
    tied_embeddings: bool = False
    type_vocab: int = 0
    image_size: int = 0
    patch_size: int = 0
    channels: int = 3
    # Dropout probabilities in training: a dropout saves its mask for the backward pass.
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0

    @property
    def layer_linears(self) -> tuple[Linear, ...]:
        """The linears of one transformer layer, named as transformers names them."""
        h, i = self.hidden, self.intermediate
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.family == Family.DECODER:
            qkv_bias = self.model_type in _QKV_BIAS
            return (
                Linear("q_proj", h, q_out, qkv_bias),
                Linear("k_proj", h, kv_out, qkv_bias),
                Linear("v_proj", h, kv_out, qkv_bias),
                Linear("o_proj", q_out, h, False),
                Linear("gate_proj", h, i, False),
                Linear("up_proj", h, i, False),
                Linear("down_proj", i, h, False),
            )
        if self.family == Family.VISION:
            return (
                Linear("q_proj", h, q_out),
                Linear("k_proj", h, q_out),
                Linear("v_proj", h, q_out),
                Linear("o_proj", q_out, h),
                Linear("fc1", h, i),
                Linear("fc2", i, h),
            )
        return (
            Linear("query", h, q_out),
            Linear("key", h, q_out),
            Linear("value", h, q_out),
            Linear("attention.output.dense", q_out, h),
            Linear("intermediate.dense", h, i),
            Linear("output.dense", i, h),
        )

    @property
    def layer_norm_parameters(self) -> int:
        # LayerNorm has a weight and a bias; RMSNorm a weight only; two norms per layer.
        return 2 * self.hidden if self.family == Family.DECODER else 4 * self.hidden

    @property
    def layer_parameters(self) -> int:
        return sum(linear.parameters for linear in self.layer_linears) + self.layer_norm_parameters

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2 if self.family == Family.VISION else 0

    @property
    def embedding_parameters(self) -> int:
        h = self.hidden
        if self.family == Family.DECODER:
            return self.vocab * h
        if self.family == Family.VISION:
            patch = self.channels * self.patch_size**2 * h + h
            return patch + h + (self.patches + 1) * h  # patch projection, [CLS] token, positions
        return (self.vocab + self.max_positions + self.type_vocab) * h + 2 * h  # + LayerNorm

    @property
    def final_norm_parameters(self) -> int:
        """The norm after the last layer (decoders and ViT; BERT's last norm is in its last layer)."""
        return {Family.DECODER: self.hidden, Family.VISION: 2 * self.hidden, Family.ENCODER: 0}[self.family]

    def backbone_parameters(self) -> int:
        return self.embedding_parameters + self.layers * self.layer_parameters + self.final_norm_parameters

    def head_linears(self, task: Task, labels: int) -> tuple[Linear, ...]:
        """The task head the runtime's Auto class adds (a BERT pooler counts as head: freeze trains it)."""
        h = self.hidden
        if task == Task.CAUSAL_LM:
            if self.family != Family.DECODER:
                raise ConfigError("model_type", f"{self.model_type} is not a causal language model")
            return (Linear("lm_head", h, self.vocab, False),)
        if self.family == Family.DECODER:
            return (Linear("score", h, labels, False),)
        if self.model_type in ROBERTA_HEADS:
            return (Linear("classifier.dense", h, h), Linear("classifier.out_proj", h, labels))
        if self.family == Family.ENCODER:
            return (Linear("pooler.dense", h, h), Linear("classifier", h, labels))
        return (Linear("classifier", h, labels),)

    def head_parameters(self, task: Task, labels: int) -> int:
        """Parameters the head adds; a tied lm_head shares the embedding and adds none."""
        if task == Task.CAUSAL_LM and self.tied_embeddings:
            return 0
        return sum(linear.parameters for linear in self.head_linears(task, labels))

    def total_parameters(self, task: Task, labels: int) -> int:
        return self.backbone_parameters() + self.head_parameters(task, labels)


def _get(config: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if key in config and config[key] is not None:
            return config[key]
    if default is None:
        raise ConfigError(keys[0], "missing; the planner needs it to size the model")
    return default


def _positive_int(config: Mapping[str, Any], *keys: str, default: int | None = None) -> int:
    value = _get(config, *keys, default=default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(keys[0], f"must be a non-negative integer, got {value!r}")
    return value


def _weight_bytes(config: Mapping[str, Any]) -> int:
    name = _get(config, "dtype", "torch_dtype", default="float32")
    if name not in DTYPE_BYTES:
        raise ConfigError("dtype", f"unsupported weight dtype {name!r}; expected one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def shape_from_config(config: Mapping[str, Any]) -> ModelShape:
    """The ModelShape of a parsed config.json; ConfigError names the key it cannot use."""
    model_type = _get(config, "model_type")
    if model_type not in FAMILY_OF_MODEL_TYPE:
        raise ConfigError(
            "model_type", f"unsupported model type {model_type!r}; the planner knows {sorted(FAMILY_OF_MODEL_TYPE)}"
        )
    family = FAMILY_OF_MODEL_TYPE[model_type]
    hidden = _positive_int(config, "hidden_size")
    heads = _positive_int(config, "num_attention_heads")
    if heads == 0 or hidden == 0:
        raise ConfigError("num_attention_heads", "hidden_size and num_attention_heads must be positive")
    dropout_defaults = 0.1 if family == Family.ENCODER else 0.0
    common: dict[str, Any] = {
        "model_type": model_type,
        "family": family,
        "layers": _positive_int(config, "num_hidden_layers"),
        "hidden": hidden,
        "intermediate": _positive_int(config, "intermediate_size"),
        "heads": heads,
        "kv_heads": _positive_int(config, "num_key_value_heads", default=heads),
        "head_dim": _positive_int(config, "head_dim", default=hidden // heads),
        "weight_bytes": _weight_bytes(config),
        "attention_dropout": float(
            _get(config, "attention_probs_dropout_prob", "attention_dropout", default=dropout_defaults)
        ),
        "hidden_dropout": float(_get(config, "hidden_dropout_prob", default=dropout_defaults)),
    }
    if family == Family.VISION:
        return ModelShape(
            **common,
            vocab=0,
            max_positions=0,
            image_size=_positive_int(config, "image_size"),
            patch_size=_positive_int(config, "patch_size"),
            channels=_positive_int(config, "num_channels", default=3),
        )
    return ModelShape(
        **common,
        vocab=_positive_int(config, "vocab_size"),
        max_positions=_positive_int(config, "max_position_embeddings"),
        tied_embeddings=bool(_get(config, "tie_word_embeddings", default=family == Family.ENCODER)),
        type_vocab=_positive_int(config, "type_vocab_size", default=2) if family == Family.ENCODER else 0,
    )
