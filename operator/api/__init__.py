"""kubetune.io/v1alpha1: the CRD models, the single source of truth for the CRDs.

Only pydantic, the standard library and the run contract may be imported here.
"""

from .common import API_VERSION, GROUP, VERSION
from .finetunejob import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus
from .modeldeployment import ModelDeployment, ModelDeploymentSpec, ModelDeploymentStatus

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "ModelDeployment",
    "ModelDeploymentSpec",
    "ModelDeploymentStatus",
]
