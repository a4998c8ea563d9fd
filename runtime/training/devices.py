"""The CUDA check of a process Ray gave GPUs to: made where CUDA is used, never on the driver.

The driver runs on the Ray head, which has no GPU; Ray Train workers and the GPU stage
tasks run on GPU nodes. A GPU node whose torch sees no CUDA device (a CPU build of
torch in the image, a driver mismatch) cannot be fixed by retrying, so it is an invalid run.
"""

from __future__ import annotations

import os

import torch
from kubetune.runtime.io.errors import InvalidRunError


def require_cuda(process: str) -> torch.device:
    """The CUDA device of `process`; InvalidRunError naming resources.gpusPerWorker when torch sees none."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    import ray

    assigned = ", ".join(str(gpu) for gpu in ray.get_gpu_ids()) or "none"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    raise InvalidRunError(
        "resources.gpusPerWorker",
        f"GPUs were requested, but {process} has no CUDA GPU: torch sees none although Ray assigned it "
        f"GPU(s) {assigned} (CUDA_VISIBLE_DEVICES={visible}); check the node's NVIDIA driver and that the "
        "image's torch is a CUDA build",
    )
