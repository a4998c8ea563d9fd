"""The run contract: pydantic models of everything a fine-tuning run needs.

The operator embeds these models in its CRDs; the runtime consumes them. This
package imports only pydantic and the standard library.
"""

from .common import DATA_URI_PATTERN, URI_PATTERN, URI_SCHEMES, ContractModel, DataUri, KubernetesName, Quantity, Uri
from .compression import Compression, Pruning, PruningMethod, Quantization, QuantizationMethod
from .data import DataFields, DataFormat, DataSpec, DataSplit, HubDataset
from .hyperparameters import AUTO, EarlyStopping, Hyperparameters, LrSchedule, Optimizer, Precision, UnresolvedAutoError
from .method import (
    PREFERENCE_OBJECTIVES,
    REFERENCE_OBJECTIVES,
    DpoLoss,
    FreezeOptions,
    LoraOptions,
    Method,
    MethodType,
    Objective,
    PreferenceOptions,
    QuantizedBaseOptions,
)
from .model import ModelSource, Task
from .run import Output, RunSpec
from .runconfig import RunConfig, RunIdentity, Sharding, WorkerResources
from .search import (
    SEARCHABLE_KEYS,
    Algorithm,
    AshaOptions,
    Metric,
    Mode,
    ParameterType,
    Scheduler,
    SearchParameter,
    SearchSpec,
)
from .serving import Batching, ServingArgs, Variant

__all__ = [
    "AUTO",
    "DATA_URI_PATTERN",
    "PREFERENCE_OBJECTIVES",
    "REFERENCE_OBJECTIVES",
    "SEARCHABLE_KEYS",
    "URI_PATTERN",
    "URI_SCHEMES",
    "Algorithm",
    "AshaOptions",
    "Batching",
    "Compression",
    "ContractModel",
    "DataFields",
    "DataFormat",
    "DataSpec",
    "DataSplit",
    "DataUri",
    "DpoLoss",
    "EarlyStopping",
    "FreezeOptions",
    "HubDataset",
    "Hyperparameters",
    "KubernetesName",
    "LoraOptions",
    "LrSchedule",
    "Method",
    "MethodType",
    "Metric",
    "Mode",
    "ModelSource",
    "Objective",
    "Optimizer",
    "Output",
    "ParameterType",
    "Precision",
    "PreferenceOptions",
    "Pruning",
    "PruningMethod",
    "Quantity",
    "Quantization",
    "QuantizationMethod",
    "QuantizedBaseOptions",
    "RunConfig",
    "RunIdentity",
    "RunSpec",
    "Scheduler",
    "SearchParameter",
    "SearchSpec",
    "ServingArgs",
    "Sharding",
    "Task",
    "UnresolvedAutoError",
    "Uri",
    "Variant",
    "WorkerResources",
]
