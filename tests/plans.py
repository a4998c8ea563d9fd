"""Plans the tests write in a plan pod's place: one that fits its GPU, one that does not."""

from __future__ import annotations

from kubetune.runtime.contract.plan import RunPlan

GIB = 2**30
FITS = RunPlan(
    gpu="H100-SXM",
    fits=True,
    devices=2,
    memory_per_device_bytes=12 * GIB,
    device_memory_bytes=80 * GIB,
    tokens_per_second=51234.0,
)
DOES_NOT_FIT = RunPlan(
    gpu="L4",
    fits=False,
    devices=1,
    memory_per_device_bytes=38 * GIB,
    device_memory_bytes=24 * GIB,
    message="needs 38 GiB per GPU, an L4 has 24: fits with method qlora, or gpusPerWorker 2 with sharding fsdp",
)
