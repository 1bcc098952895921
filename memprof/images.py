"""Image classification runs (``--task image-cls``): the images' size and the tokens the encoder sees (pure; only
``image_batch``, which the runtime calls, imports torch).

An image-cls run is sized by its images, not by a sequence length: ``RunSetup.image_size`` (default: the config's
``image_size``) is the side of the square images, and ``RunSetup.seq_len`` is derived from it, the tokens the
encoder runs on, so records, throughput (tokens/s) and reports stay meaningful: a ViT cuts an image into
(image_size // patch_size)^2 patches and prepends its [CLS] token (DeiT also a distillation token), e.g. 197 tokens
for ViT-B/16 at 224 pixels. A ``seq_len`` that disagrees is refused. A size other than the config's builds the
model at that size (``config.image_size``: a position table of as many rows as tokens), as a checkpoint fine-tuned
at that resolution has it (google/vit-base-patch16-384); the trace and the measurement build the same model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .compat import method_name
from .config import Method, RunSetup
from .errors import ConfigError
from .spec import ModelSpec, Task

# methods that prepend virtual tokens to, or train rows of, a token embedding matrix
TOKEN_METHODS = (Method.prefix, Method.prompt, Method.p_tuning, Method.trainable_tokens)
DEFAULT_SEQ_LEN = next(f.default for f in dataclasses.fields(RunSetup) if f.name == "seq_len")
# tokens a ViT-style encoder prepends to the patches: [CLS], and DeiT's distillation token (modeling_deit.py)
PREPENDED_TOKENS: dict[str, int] = {"deit": 2}
IMAGE_HEADS = ("classifier",)  # the head of transformers' *ForImageClassification (ViT, BEiT, ConvNeXt, ...)


def _positive(cfg: dict[str, Any], key: str, name: str) -> int | None:
    value = cfg.get(key)
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]  # (224, 224)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"config of {name}: {key} must be a positive integer (square images), got {value!r}"[:200])
    return value


def image_tokens(spec: ModelSpec, image_size: int) -> int:
    """Tokens the encoder of ``spec`` sees for one image of ``image_size`` pixels a side: the patches plus the
    tokens it prepends (ViT-style configs, with a ``patch_size``); 1 for a model without patches (a CNN: one
    image, no token sequence).

    Raises:
        ConfigError: an image smaller than one patch.
    """
    patch = _positive(dict(spec.hf_config or {}), "patch_size", spec.name)
    if patch is None:
        return 1
    if image_size < patch:
        raise ConfigError(f"image size {image_size} is smaller than {spec.name}'s {patch}-pixel patches")
    return (image_size // patch) ** 2 + PREPENDED_TOKENS.get(spec.model_type, 1)


def image_run(spec: ModelSpec, setup: RunSetup) -> RunSetup:
    """``setup`` with its image size (the config's when unset) and ``seq_len`` = the tokens of one image, for an
    image-cls run; any other run unchanged. Idempotent.

    Raises:
        ConfigError: an image size on a text task; a sequence length on an image-cls run that is neither the
            default nor the tokens of its images; a config without an image_size and no size given.
    """
    if spec.task is not Task.image_cls:
        if setup.image_size is not None:
            raise ConfigError(f"image size applies to --task image-cls only, not to {spec.task.value}")
        return setup
    if setup.method in TOKEN_METHODS:
        raise ConfigError(f"{method_name(setup)} works on token embeddings; an image classifier has none (its input "
                          "is pixels): choose full, lora or another LoRA-like method, ia3 or bitfit")
    if setup.padded:
        raise ConfigError("padded batches do not apply to image-cls: every image has the same tokens, none padding")
    size = setup.image_size or _positive(dict(spec.hf_config or {}), "image_size", spec.name)
    if size is None:
        raise ConfigError(f"config of {spec.name} has no image_size; give --image-size")
    tokens = image_tokens(spec, size)
    if setup.seq_len not in (DEFAULT_SEQ_LEN, tokens):
        raise ConfigError(f"sequence length {setup.seq_len} does not apply to image-cls: {spec.name} sees {tokens} "
                          f"tokens per {size}x{size} image; set the image size instead (--image-size)")
    return dataclasses.replace(setup, image_size=size, seq_len=tokens)


def image_note(spec: ModelSpec, setup: RunSetup) -> str | None:
    """'images of 224x224 pixels: 197 tokens each (...)' for an image-cls run (after ``image_run``), else None."""
    if spec.task is not Task.image_cls or setup.image_size is None:
        return None
    return f"images of {setup.image_size}x{setup.image_size} pixels: {setup.seq_len} tokens each (the run's seq_len)"


def image_batch(spec: ModelSpec, setup: RunSetup, device: Any, dtype: Any) -> dict[str, Any]:
    """The synthetic batch of an image-cls step (the runtime's; imports torch): ``pixel_values`` (b, channels,
    size, size) in ``dtype`` (the patch projection's: ViTModel casts other inputs to it) and ``labels`` (b,)
    below num_labels. Works under FakeTensorMode."""
    import torch

    b, size = setup.batch_size, setup.image_size
    if size is None:
        raise ConfigError("an image-cls batch needs the run's image size (memprof.images.image_run)")
    channels = _positive(dict(spec.hf_config or {}), "num_channels", spec.name) or 3
    return {"pixel_values": torch.randn(b, channels, size, size, device=device, dtype=dtype),
            "labels": torch.randint(0, spec.num_labels, (b,), device=device)}



def saved_head(spec: ModelSpec) -> list[str] | None:
    """The modules a peft method trains in full on an image-cls run: the classifier, as peft's image
    classification example saves it (``modules_to_save=["classifier"]``); peft has no image task type that would,
    as SEQ_CLS does for seq-cls. None for every other task (the peft task type decides)."""
    return list(IMAGE_HEADS) if spec.task is Task.image_cls else None
