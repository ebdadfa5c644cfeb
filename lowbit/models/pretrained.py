"""Loading local Hugging Face checkpoint folders (never downloading).

A folder that holds a ``config.json`` but no weights (a model described by its config only, as
one writes for a small experiment), or the path of such a config.json itself, gives a freshly
initialized model of that architecture, drawn from the caller's torch RNG.
"""

from __future__ import annotations

from pathlib import Path


def with_sdpa(build):
    """``build(attn_implementation="sdpa")``: the model with PyTorch's SDPA attention, or with its
    own (eager) attention, ``build()``, for architectures that have no SDPA version (BLOOM)."""
    try:
        return build(attn_implementation="sdpa")
    except ValueError as error:
        if "scaled_dot_product_attention" not in str(error):
            raise
    return build()


# What `save_pretrained` writes for the weights (one file, or an index of shards).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def has_weights(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in WEIGHT_FILES)


def from_pretrained(auto_class, folder: Path, **kwargs):
    """``auto_class.from_pretrained(folder)`` offline, with SDPA attention where it exists; a
    fresh model from the folder's config where it holds no weights (see the module doc)."""
    if not has_weights(folder):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder, local_files_only=True, **kwargs)
        return with_sdpa(lambda **kw: auto_class.from_config(config, **kw))
    return with_sdpa(
        lambda **kw: auto_class.from_pretrained(folder, local_files_only=True, **kwargs, **kw)
    )
