"""Loading local Hugging Face checkpoint folders (never downloading)."""

from __future__ import annotations

from pathlib import Path


def from_pretrained(auto_class, folder: Path, **kwargs):
    """``auto_class.from_pretrained(folder)`` offline, with PyTorch's SDPA attention, or the model's
    own (eager) attention for architectures that have no SDPA version (BLOOM)."""
    try:
        return auto_class.from_pretrained(
            folder, local_files_only=True, attn_implementation="sdpa", **kwargs
        )
    except ValueError as error:
        if "scaled_dot_product_attention" not in str(error):
            raise
    return auto_class.from_pretrained(folder, local_files_only=True, **kwargs)
