"""Low-precision inference and compression: post-training quantization (int8, int4, fp8, MXFP4,
NVFP4), magnitude pruning (unstructured, N:M), evaluation against the source model, and export of
causal LMs to Hugging Face folders.

``lowbit quantize`` / ``prune`` write an *inference folder* (see `lowbit.infer.io`); ``lowbit
eval`` / ``generate`` read it through `load_as_run` and `evaluate_inference_dir`.
"""

from lowbit.errors import UsageError
from lowbit.infer.evaluate import compare, evaluate_inference_dir, kernel_note
from lowbit.infer.io import MANIFEST, Source, is_inference_dir, load_source
from lowbit.infer.model import (
    dequantize_model,
    magnitude_mask,
    prune_model,
    quant_layers,
    quantize_model,
    set_kernel,
)
from lowbit.infer.modules import QuantLinear
from lowbit.infer.quant import Mode, QuantRecipe, Target, targets
from lowbit.infer.steps import export_hf, prune_run, quantize_run


def load_as_run(path, device=None):
    """An inference folder as the `lowbit.train.LoadedRun` that ``eval``/``generate`` use.

    A training run is refused: `load_source` reads one too (quantize's input), but as an fp32
    model with no checkpoint of its own, which would evaluate it in other numerics than its
    recipe's; `lowbit.train.load_run` loads either kind of folder as ``lowbit eval`` does."""
    from lowbit.infer.evaluate import fp32_precision
    from lowbit.infer.io import WEIGHTS
    from lowbit.train.evaluate import LoadedRun
    from lowbit.train.trainer import resolve_device

    device = resolve_device(device or "cpu")
    source = load_source(path, device)
    if source.manifest is None:
        raise UsageError(
            f"{path}: a training run, not a folder written by lowbit quantize/prune; fix: load "
            "it with lowbit.train.load_run, which reads either with the run's own recipe"
        )
    model = source.model
    model.lowbit_inference_note = kernel_note(model)
    return LoadedRun(
        source.config,
        source.task,
        model,
        fp32_precision(device),
        source.path / WEIGHTS,
        source.step,
    )


__all__ = [
    "MANIFEST",
    "Mode",
    "QuantLinear",
    "QuantRecipe",
    "Source",
    "Target",
    "compare",
    "dequantize_model",
    "evaluate_inference_dir",
    "export_hf",
    "is_inference_dir",
    "kernel_note",
    "load_as_run",
    "load_source",
    "magnitude_mask",
    "prune_model",
    "prune_run",
    "quant_layers",
    "quantize_model",
    "quantize_run",
    "set_kernel",
    "targets",
]
