"""Loading local Hugging Face checkpoint folders (never downloading)."""

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


def from_pretrained(auto_class, folder: Path, **kwargs):
    """``auto_class.from_pretrained(folder)`` offline, with SDPA attention where it exists."""
    return with_sdpa(
        lambda **kw: auto_class.from_pretrained(folder, local_files_only=True, **kwargs, **kw)
    )
