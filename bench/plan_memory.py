"""The planner's peak-memory estimate against the peak measured in one real training step.

Three model families (a BERT text classifier, a Llama causal LM, a ViT image classifier),
random-initialised from configs and saved like any Hugging Face model, are loaded through
the runtime's own code (`load_base`, `apply_method`, `build_optimizer`, the task's loss) and
trained the way the runtime's loop trains: forward, loss, backward, gradient clipping,
optimizer step, gradients cleared to None. The measured peak is that of the second step
(the optimizer's state then exists, as in every later step): on CUDA
`torch.cuda.max_memory_allocated`, on CPU torch's MemTracker (every live tensor's storage).
Each configuration prints estimate / measured; the script fails when one is outside 0.85-1.15.

    python bench/plan_memory.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from kubetune.runtime.contract import Hyperparameters, Method, ModelSource, Optimizer, Task
from kubetune.runtime.data.task_ops import task_ops
from kubetune.runtime.evaluate import forward_logits
from kubetune.runtime.models import ModelLocation, apply_method, load_base
from kubetune.runtime.planner import DeviceKind, PlanInput, plan, shape_from_config
from kubetune.runtime.training.optim import build_optimizer
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

BOUNDS = (0.85, 1.15)
LABELS = ["a", "b", "c", "d"]
SEED = 0


def _bert(folder: Path) -> None:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024
    )
    BertModel(config).save_pretrained(folder)


def _llama(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=8000,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=688,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)


def _vit(folder: Path) -> None:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        image_size=64, patch_size=8, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024
    )
    ViTModel(config).save_pretrained(folder)


FAMILIES: dict[str, tuple[Task, Callable[[Path], None]]] = {
    "bert": (Task.TEXT_CLASSIFICATION, _bert),
    "llama": (Task.CAUSAL_LM, _llama),
    "vit": (Task.IMAGE_CLASSIFICATION, _vit),
}


@dataclass(frozen=True)
class Case:
    family: str
    method: str
    batch: int
    length: int
    checkpointing: bool = False
    optimizer: Optimizer = Optimizer.ADAMW
    accumulation: int = 1

    @property
    def name(self) -> str:
        extras = (" ckpt" if self.checkpointing else "") + (
            f" {self.optimizer.value}" if self.optimizer != "adamw" else ""
        )
        extras += f" acc{self.accumulation}" if self.accumulation > 1 else ""
        return f"{self.family} {self.method} b{self.batch} s{self.length}{extras}"


CASES = (
    Case("bert", "full", 8, 128),
    Case("bert", "full", 16, 64, optimizer=Optimizer.SGD),
    Case("bert", "lora", 16, 128),
    Case("bert", "freeze", 16, 128),
    Case("bert", "full", 8, 256, checkpointing=True),
    Case("bert", "lora", 8, 128, accumulation=2),
    Case("llama", "full", 4, 128),
    Case("llama", "lora", 8, 256),
    Case("llama", "freeze", 8, 128),
    Case("llama", "lora", 8, 256, checkpointing=True),
    Case("llama", "dora", 4, 128),
    Case("vit", "full", 16, 65),
    Case("vit", "lora", 32, 65),
    Case("vit", "freeze", 32, 65),
    Case("vit", "full", 32, 65, optimizer=Optimizer.SGD),
)


def _inputs(task: Task, case: Case, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED)
    if task == Task.IMAGE_CLASSIFICATION:
        inputs = {"pixel_values": torch.randn(case.batch, 3, 64, 64, generator=generator)}
    else:
        ids = torch.randint(0, vocab, (case.batch, case.length), generator=generator)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == Task.CAUSAL_LM:
        inputs["labels"] = inputs["input_ids"].clone()
    else:
        inputs["labels"] = torch.randint(0, len(LABELS), (case.batch,), generator=generator)
    return {name: value.to(device) for name, value in inputs.items()}


def _method(case: Case) -> Method:
    if case.family == "vit" and case.method in ("lora", "dora"):
        # transformers 5 names ViT's projections q_proj/k_proj/v_proj.
        return Method.model_validate({"type": case.method, "lora": {"targetModules": ["q_proj", "v_proj"]}})
    return Method.model_validate({"type": case.method})


def _step(model: Any, optimizer: torch.optim.Optimizer, task: Task, batches: list[dict[str, torch.Tensor]]) -> None:
    """One optimizer step over accumulated micro-batches as the runtime's loop takes it (fp32: no autocast)."""
    for inputs in batches:
        loss = task_ops(task, len(LABELS)).loss(forward_logits(model, inputs), inputs["labels"]) / len(batches)
        loss.backward()  # type: ignore[no-untyped-call]
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(folder: Path, task: Task, case: Case, device: torch.device) -> int:
    """Peak bytes of live tensors during the second training step of `case`."""
    torch.manual_seed(SEED)
    source = ModelSource.model_validate({"uri": str(folder), "task": task.value})
    model: Any = apply_method(load_base(ModelLocation(str(folder)), source, LABELS, SEED), _method(case), task)
    if case.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device).train()
    hp = Hyperparameters(optimizer=case.optimizer, batch_size=case.batch, max_sequence_length=case.length)
    optimizer = build_optimizer(model, hp)
    vocab = getattr(model.config, "vocab_size", 0)

    def batches() -> list[dict[str, torch.Tensor]]:
        return [_inputs(task, case, vocab, device) for _ in range(case.accumulation)]

    _step(model, optimizer, task, batches())
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _step(model, optimizer, task, batches())
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    tracker = LiveBytes()
    for tensor in [*model.parameters(), *model.buffers(), *_state_tensors(optimizer)]:
        tracker.track(tensor)
    with tracker:
        _step(model, optimizer, task, batches())
    return tracker.peak


def _state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]


class LiveBytes(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Bytes of live tensor storages and their peak: every op's outputs are tracked until freed."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.seen: weakref.WeakKeyDictionary[torch.UntypedStorage, int] = weakref.WeakKeyDictionary()
        self.current = 0
        self.peak = 0

    def _free(self, size: int) -> None:
        self.current -= size

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self.seen or storage.device.type == "meta":
            return
        size = storage.nbytes()
        self.seen[storage] = size
        weakref.finalize(storage, self._free, size)
        self.current += size
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.track(tensor)
        return out


def estimate(folder: Path, task: Task, case: Case, device: torch.device) -> int:
    config = json.loads((folder / "config.json").read_text())
    request = PlanInput(
        shape=shape_from_config(config),
        task=task,
        method=_method(case),
        batch_size=case.batch,
        sequence_length=case.length,
        optimizer=case.optimizer,
        gradient_checkpointing=case.checkpointing,
        gradient_accumulation_steps=case.accumulation,
        labels=len(LABELS),
        device=DeviceKind.CUDA if device.type == "cuda" else DeviceKind.CPU,
    )
    return plan(request, gpus=()).memory.peak_bytes


def main() -> None:
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True, warn_only=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print(f"{'configuration':<28} {'estimate MiB':>13} {'measured MiB':>13} {'ratio':>7}")
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as root:
        folders: dict[str, Path] = {}
        for name, (_, build) in FAMILIES.items():
            torch.manual_seed(SEED)
            folders[name] = Path(root) / name
            build(folders[name])
        for case in CASES:
            task = FAMILIES[case.family][0]
            estimated = estimate(folders[case.family], task, case, device)
            measured = measure(folders[case.family], task, case, device)
            ratios[case.name] = estimated / measured
            print(f"{case.name:<28} {estimated / 2**20:>13.2f} {measured / 2**20:>13.2f} {ratios[case.name]:>7.3f}")
    worst = max(ratios, key=lambda name: abs(ratios[name] - 1))
    print(f"worst: {worst} {ratios[worst]:.3f}; bounds {BOUNDS[0]}-{BOUNDS[1]}; {len(ratios)} configurations")
    outside = [name for name, ratio in ratios.items() if not BOUNDS[0] <= ratio <= BOUNDS[1]]
    if outside:
        print("outside the bounds: " + ", ".join(outside))
        sys.exit(1)


if __name__ == "__main__":
    main()
