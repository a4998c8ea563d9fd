"""Common data-centre GPUs: memory and dense peak throughput per data type, from their datasheets.

Peaks are dense (without 2:4 sparsity), in TFLOPS; `None` where the chip has no such math
(no bf16 before Ampere; no TF32 tensor cores before Ampere).
"""

from __future__ import annotations

from kubetune.runtime.contract import ContractModel, Precision
from pydantic import Field

GIB = 1024**3


class GpuType(ContractModel):
    """One GPU model: what fits on it and how fast it multiplies."""

    name: str = Field(description="Short name, e.g. H100-SXM.")
    memory_gib: float = Field(gt=0, description="Device memory in GiB.")
    fp32_tflops: float = Field(gt=0, description="Dense FP32 peak (non-tensor-core), TFLOPS.")
    tf32_tflops: float | None = Field(default=None, gt=0, description="Dense TF32 tensor-core peak, TFLOPS.")
    bf16_tflops: float | None = Field(default=None, gt=0, description="Dense BF16 tensor-core peak, TFLOPS.")
    fp16_tflops: float = Field(gt=0, description="Dense FP16 tensor-core peak, TFLOPS.")
    source: str = Field(description="The datasheet these figures come from.")
    products: tuple[str, ...] = Field(
        default=(),
        description="Its names in the node label nvidia.com/gpu.product (GPU feature discovery: the driver's "
        "product name with dashes), which resources.gpuType matches.",
    )

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    @property
    def supports_bf16(self) -> bool:
        return self.bf16_tflops is not None

    def peak_tflops(self, precision: Precision) -> float | None:
        """The peak the training's matrix multiplies run at; None where the GPU lacks the type.

        fp32 training runs at the FP32 peak: PyTorch leaves TF32 matmuls off unless asked.
        """
        if precision == Precision.BF16:
            return self.bf16_tflops
        if precision == Precision.FP16:
            return self.fp16_tflops
        return self.fp32_tflops


GPU_TYPES: tuple[GpuType, ...] = (
    GpuType(
        name="T4",
        memory_gib=16,
        fp32_tflops=8.1,
        fp16_tflops=65,
        source="https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/t4-tensor-core-datasheet-951643.pdf",
        products=("Tesla-T4",),
    ),
    GpuType(
        name="V100",
        memory_gib=32,
        fp32_tflops=15.7,
        fp16_tflops=125,
        source="https://images.nvidia.com/content/technologies/volta/pdf/volta-v100-datasheet-update-us-1165301-r5.pdf",
        products=("Tesla-V100-SXM2-32GB", "Tesla-V100-PCIE-32GB", "Tesla-V100S-PCIE-32GB"),
    ),
    GpuType(
        name="A10",
        memory_gib=24,
        fp32_tflops=31.2,
        tf32_tflops=62.5,
        bf16_tflops=125,
        fp16_tflops=125,
        source="https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a10/pdf/a10-datasheet.pdf",
        products=("NVIDIA-A10",),
    ),
    GpuType(
        name="L4",
        memory_gib=24,
        fp32_tflops=30.3,
        tf32_tflops=60,
        bf16_tflops=121,
        fp16_tflops=121,
        source="https://www.nvidia.com/en-us/data-center/l4/",
        products=("NVIDIA-L4",),
    ),
    GpuType(
        name="L40S",
        memory_gib=48,
        fp32_tflops=91.6,
        tf32_tflops=183,
        bf16_tflops=362.05,
        fp16_tflops=362.05,
        source="https://www.nvidia.com/en-us/data-center/l40s/",
        products=("NVIDIA-L40S",),
    ),
    GpuType(
        name="A100-40GB",
        memory_gib=40,
        fp32_tflops=19.5,
        tf32_tflops=156,
        bf16_tflops=312,
        fp16_tflops=312,
        source="https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
        products=("NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-PCIE-40GB"),
    ),
    GpuType(
        name="A100-80GB",
        memory_gib=80,
        fp32_tflops=19.5,
        tf32_tflops=156,
        bf16_tflops=312,
        fp16_tflops=312,
        source="https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
        products=("NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe"),
    ),
    GpuType(
        name="H100-PCIe",
        memory_gib=80,
        fp32_tflops=51,
        tf32_tflops=378,
        bf16_tflops=756,
        fp16_tflops=756,
        source="https://www.nvidia.com/en-us/data-center/h100/",
        products=("NVIDIA-H100-PCIe",),
    ),
    GpuType(
        name="H100-SXM",
        memory_gib=80,
        fp32_tflops=67,
        tf32_tflops=494.5,
        bf16_tflops=989.5,
        fp16_tflops=989.5,
        source="https://www.nvidia.com/en-us/data-center/h100/",
        products=("NVIDIA-H100-80GB-HBM3",),
    ),
    GpuType(
        name="H200",
        memory_gib=141,
        fp32_tflops=67,
        tf32_tflops=494.5,
        bf16_tflops=989.5,
        fp16_tflops=989.5,
        source="https://www.nvidia.com/en-us/data-center/h200/",
        products=("NVIDIA-H200",),
    ),
    GpuType(
        name="B200",
        memory_gib=180,
        fp32_tflops=75,
        tf32_tflops=1100,
        bf16_tflops=2250,
        fp16_tflops=2250,
        source="https://www.nvidia.com/en-us/data-center/hgx/",
        products=("NVIDIA-B200",),
    ),
    GpuType(
        name="MI300X",
        memory_gib=192,
        fp32_tflops=163.4,
        tf32_tflops=653.7,
        bf16_tflops=1307.4,
        fp16_tflops=1307.4,
        source="https://www.amd.com/en/products/accelerators/instinct/mi300/mi300x.html",
    ),
)


def gpu_type(name: str) -> GpuType:
    """The GPU type of `name` or of a gpu.product label value (case-insensitive); ValueError listing the names."""
    for gpu in GPU_TYPES:
        if name.lower() in {gpu.name.lower(), *(product.lower() for product in gpu.products)}:
            return gpu
    raise ValueError(f"unknown GPU type {name!r}; known: {', '.join(gpu.name for gpu in GPU_TYPES)}")
