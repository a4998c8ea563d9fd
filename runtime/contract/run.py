"""The whole run contract: everything one fine-tuning run needs."""

from __future__ import annotations

from pydantic import Field, model_validator

from .common import ContractModel, Uri, cel_rule, with_cel
from .compression import Compression
from .data import DataFormat, DataSpec
from .evaluation import EvaluationSpec, LmEvalSpec
from .hyperparameters import AUTO_FIELDS, Hyperparameters
from .method import PREFERENCE_OBJECTIVES, Method, Objective
from .model import CLASSIFICATION_TASKS, ModelSource, Task
from .search import METRIC_MODE, Metric, Mode, SearchSpec
from .serving import ServingArgs

CLASSIFICATION_METRICS = frozenset({Metric.ACCURACY, Metric.F1, Metric.LOSS})
CAUSAL_LM_METRICS = frozenset({Metric.LOSS, Metric.PERPLEXITY})
PREFERENCE_METRICS = CAUSAL_LM_METRICS | {Metric.PREFERENCE_ACCURACY, Metric.REWARD_MARGIN}


def allowed_metrics(task: Task, objective: Objective) -> frozenset[Metric]:
    """The test metrics a run of `task` trained with `objective` reports."""
    if task in CLASSIFICATION_TASKS:
        return CLASSIFICATION_METRICS
    return PREFERENCE_METRICS if objective in PREFERENCE_OBJECTIVES else CAUSAL_LM_METRICS


def _listed(metrics: frozenset[Metric]) -> str:
    return "[" + ", ".join(f"'{m.value}'" for m in sorted(metrics)) + "]"


def metric_rule(field: str) -> str:
    """CEL: the metric at `self.<field>` is one that the run's task and objective report."""
    preference = "has(self.method) && has(self.method.objective) && self.method.objective != 'sft'"
    return (
        f"!has(self.{field.split('.')[0]}) || !has(self.{field}) || (self.model.task == 'causal-lm'"
        f" ? ({preference} ? self.{field} in {_listed(PREFERENCE_METRICS)}"
        f" : self.{field} in {_listed(CAUSAL_LM_METRICS)}) : self.{field} in {_listed(CLASSIFICATION_METRICS)})"
    )


METRICS_MESSAGE = (
    "does not apply to model.task and method.objective (classification: accuracy, f1, loss; causal-lm: loss, "
    "perplexity; preference objectives also preferenceAccuracy, rewardMargin)"
)


class Output(ContractModel):
    """Where checkpoints, exported variants and the kubetune.json manifest are written."""

    uri: Uri = Field(
        description=(
            "Output location: s3://<bucket>/<prefix>, pvc://<claim>/<path>, file://<path> or a path. On a cluster,"
            " run N of a FineTuneJob writes under <uri>/runs/N."
        )
    )
    keep_checkpoints: int = Field(
        default=2, ge=1, le=100, description="Newest training checkpoints kept for resuming after a failure."
    )


PACKING_MESSAGE = "data.packing packs causal-LM examples: it needs model.task causal-lm"
PACKING_OBJECTIVE_MESSAGE = "data.packing packs supervised examples: it needs method.objective sft"
PREFERENCE_MESSAGE = "a preference objective (dpo, orpo, kto, simpo) needs model.task causal-lm"
LM_EVAL_MESSAGE = "evaluation.lmEval scores language models: it needs model.task causal-lm"


# Admission-time mirrors of RunSpec's validators; models that extend RunSpec add these.
RUN_SPEC_RULES = (
    cel_rule(
        "self.data.format != 'imagefolder' || self.model.task == 'image-classification'",
        "data.format imagefolder needs model.task image-classification",
        ".data.format",
    ),
    cel_rule(
        "!has(self.data.packing) || !self.data.packing || self.model.task == 'causal-lm'",
        PACKING_MESSAGE,
        ".data.packing",
    ),
    cel_rule(
        "!has(self.data.packing) || !self.data.packing || !has(self.method) || !has(self.method.objective)"
        " || self.method.objective == 'sft'",
        PACKING_OBJECTIVE_MESSAGE,
        ".data.packing",
    ),
    cel_rule(
        "!has(self.method) || !has(self.method.objective) || self.method.objective == 'sft'"
        " || self.model.task == 'causal-lm'",
        PREFERENCE_MESSAGE,
        ".method.objective",
    ),
    cel_rule(metric_rule("search.metric"), f"search.metric {METRICS_MESSAGE}", ".search.metric"),
    cel_rule(
        "!has(self.evaluation) || !has(self.evaluation.lmEval) || self.model.task == 'causal-lm'",
        LM_EVAL_MESSAGE,
        ".evaluation.lmEval",
    ),
    *(
        cel_rule(
            f"!has(self.search) || !has(self.hyperparameters) || !has(self.hyperparameters.{key})"
            f" || string(self.hyperparameters.{key}) != 'auto' || !('{key}' in self.search.space)",
            f"search.space.{key}: hyperparameters.{key} is auto, resolved by kubetune; search it or leave it auto",
            ".search.space",
        )
        for key in AUTO_FIELDS
        if key != "gradientCheckpointing"  # never searched
    ),
)


class RunSpec(ContractModel):
    """What to fine-tune, on which data, how, and what to do with the result."""

    model_config = with_cel(*RUN_SPEC_RULES)

    model: ModelSource = Field(description="The base model and the task.")
    data: DataSpec = Field(description="Training, validation and test data.")
    method: Method = Field(default_factory=Method, description="Fine-tuning method: full, lora, dora, qlora or freeze.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, description="Training settings.")
    search: SearchSpec | None = Field(default=None, description="Optional hyperparameter search with Ray Tune.")
    compression: Compression = Field(
        default_factory=Compression, description="Compressed variants and their accuracy budget."
    )
    output: Output = Field(description="Where results are written.")
    serving: ServingArgs = Field(default_factory=ServingArgs, description="Serving defaults for the result.")
    evaluation: EvaluationSpec | None = Field(
        default=None, description="Benchmarks the models are scored on besides the test split."
    )

    @model_validator(mode="after")
    def _fits_the_task(self) -> RunSpec:
        task = self.model.task
        if self.data.format == DataFormat.IMAGE_FOLDER and task != Task.IMAGE_CLASSIFICATION:
            raise ValueError(f"data.format imagefolder needs model.task image-classification, not {task.value}")
        if self.data.packing and task != Task.CAUSAL_LM:
            raise ValueError(f"{PACKING_MESSAGE}, not {task.value}")
        objective = self.method.resolved_objective
        if objective in PREFERENCE_OBJECTIVES and task != Task.CAUSAL_LM:
            raise ValueError(f"method.objective {objective.value}: {PREFERENCE_MESSAGE}, not {task.value}")
        if self.evaluation is not None and self.evaluation.lm_eval is not None and task != Task.CAUSAL_LM:
            raise ValueError(f"{LM_EVAL_MESSAGE}, not {task.value}")
        if self.data.packing and objective != Objective.SFT:
            raise ValueError(f"{PACKING_OBJECTIVE_MESSAGE}, not {objective.value}")
        if self.search is not None and self.search.metric is not None:
            allowed = allowed_metrics(task, objective)
            if self.search.metric not in allowed:
                raise ValueError(
                    f"search.metric {self.search.metric.value} does not apply to {task.value}; "
                    f"use one of {', '.join(sorted(m.value for m in allowed))}"
                )
        if self.search is not None:
            for key in self.hyperparameters.auto_fields():
                if key in self.search.space:
                    raise ValueError(
                        f"search.space.{key}: hyperparameters.{key} is auto, resolved by kubetune; "
                        "search it or leave it auto"
                    )
        return self

    @property
    def search_metric(self) -> Metric:
        """The metric that ranks trials and gates promotion when none is named."""
        if self.search is not None and self.search.metric is not None:
            return self.search.metric
        if self.model.task in CLASSIFICATION_TASKS:
            return Metric.ACCURACY
        return Metric.REWARD_MARGIN if self.method.resolved_objective in PREFERENCE_OBJECTIVES else Metric.LOSS

    @property
    def lm_eval(self) -> LmEvalSpec | None:
        return self.evaluation.lm_eval if self.evaluation is not None else None

    @property
    def search_mode(self) -> Mode:
        return METRIC_MODE[self.search_metric]
