"""Estimating training memory from a model config, a recipe and an optimizer-state precision.

Model states (exact: the tests compare them with `measure` byte for byte)
-------------------------------------------------------------------------
Parameter shapes come from instantiating the model on fake tensors (no memory, below), so every
tensor's size is known and the small-tensor rule of the optimizer states is applied per tensor.

- parameters: ``numel x`` the recipe's ``param_dtype`` size;
- gradients: the same dtype (autograd's ``.grad`` has the parameter's dtype), for the parameters
  the traced loss reaches only (so master weights and optimizer states too): a multimodal model
  trained on text leaves its vision tower without any;
- master weights: 4 bytes per parameter with ``master_dtype="fp32"``; a Kahan recipe's compensation
  buffer instead, one parameter-dtype value per parameter;
- optimizer states: Adam's two moments and step counter per tensor (`lowbit.optim.adam_state_bytes`).

Under DDP (``sharding="ddp"``, or ``"none"`` over several GPUs: `lowbit train --nproc N`) each
``.grad`` is a view of DistributedDataParallel's all-reduce buckets (`lowbit.distributed.ddp`):
the gradients are held once, but DDP rebuilds the buckets once, before the second step's forward
(torch's ``_pre_forward``), making the new ones before the old are freed: a second copy of the
gradients (``bucket_rebuild``) while no activations are live. So the peak, `Breakdown.total`, is
model states + max(gradients, activations + temporaries + logits' gradient), and a note names the
term that sets it (until session 40 both were added: over by the smaller of the two).

With ``sharding="fsdp"`` these four are the first rank's shards (ZeRO-3 / FSDP full sharding,
`_first_shard`: ``ceil(rows / gpus)`` rows of each parameter, to which FSDP2 pads every rank's
parameters and gradients; the step counter and code maps of each tensor whole on every rank);
the fp32-states rule is decided on the global tensor. FSDP gathers the parameters in the compute dtype (`lowbit.distributed.fsdp`: the
recipe's autocast dtype, else its parameter dtype), so the forward is traced with parameters in
that dtype (autocast then makes no weight copies), and the gathered parameters of the current and
the prefetched block, and of the root (embeddings, final norm, head: FSDP2 keeps the root's
gathered from its forward to its backward), are added to the temporaries.

Activations and temporary copies (traced: any causal language model transformers builds)
--------------------------------------------------------------------------------------------
The forward and the loss of one step (``F.cross_entropy`` on the fp32 logits, as the trainer
computes it) run on *fake tensors* (``torch._subclasses.FakeTensorMode``: shapes, dtypes and
storages without memory or arithmetic), with the parameters in the recipe's dtype, under its
autocast, with PyTorch's SDPA attention where the architecture has it (as `lowbit train` loads
it). Every tensor autograd's pack hook receives (``torch.autograd.graph.saved_tensors_hooks``) is
counted once per storage, parameters excluded; casts of a parameter (autocast's bf16 weights) are
temporary copies, the rest activations: what `measure_activations` counts on a live run, so for
unconverted layers the estimate is the measurement (byte for byte on CPU; a GPU's autocast casts
a few ops differently). The architecture's own code decides what is saved, so GPT-2, Falcon,
BLOOM, Mixtral, Mamba, ... are estimated as they train, not as a Llama. Where transformers would
read tensor values to choose a path, the trace takes the real run's choice (`_as_in_a_real_run`).

Converted (fp8/int8/MX) layers are the exception: their operands are quantized in lowbit's own
kernels, into bf16 carriers on the CPU, so the trace replaces what such a layer saves with a
model of the hardware that stores the formats natively: its input quantized (the format's bits
per value) when the forward's quantized operand can be reused by the weight gradient (tensorwise
scaling), else in high precision (the input as it came, autocast or not, one tensor for the
layers that read it; until session 34 a bf16 copy per layer under autocast, 6% over `nano`'s
measured fp8-rowwise activations; a cast where the weight gradient is a GEMM of plain casts, as
int8's bf16 one, `_kept_input_dtype`), and
its weight as a quantized temporary copy; a converted mixture-of-experts layer likewise for each
grouped expert GEMM (`lowbit.nn.experts`). (The CPU emulation keeps quantized values in a bf16
carrier.) Layers that read one tensor one after another (a block's q, k and v; gate and up) keep
one quantization or cast of it between them where the run shares it
(`lowbit.nn.operand.SharedQuantization`, modelled by `_SharedSlot`), which it does only where no
GPU sync is needed to know the quantizations equal: in one process (``gpus=1``; ranks that agree
on scales quantize per layer), with current scaling (a delayed scale is a tensor on the GPU: per
layer). That is a GPU's run; on a CPU the delayed scale is a CPU scalar and those layers share
too (`nano`'s fp8-delayed at 8 x 128: 589,824 bytes fewer than this estimate; docs/memory.md).
Until session 32 every layer's quantized input was counted (those 589,824 bytes too many for
fp8-tensorwise) and int8's cast once over several ranks too (1,179,648 bytes too few at two).
With activation checkpointing (one checkpoint per block: the outermost numbered blocks,
`lowbit.recipes.recipe.block_stacks`) only each block's inputs are kept (its positional tensor
arguments, which a non-reentrant checkpoint saves: the hidden states, and BERT's attention mask,
one tensor for every block), plus one block's activations recomputed during its backward (each
storage once: the inputs the checkpoint keeps are not counted again).

The backward's first op, cross-entropy's on the fp32 logits, makes the one large transient that
coexists with every activation (``logits_gradient``, `LOGITS_GRADIENT_COPIES` x the logits'
elements x 4 bytes: the loss's gradient of the log-softmax output, then the log-softmax's of the
logits, both live as the second is made). Until session 40 it was left out, the measured peak
over the estimate by 4.4% (vocabulary 257, 8 x 128) to 25.3% (32,000, 4 x 64). With activation
checkpointing it is added to the recomputed block's activations, which are live only later: over
by the smaller of the two. Not modelled: other transient workspace (attention scratch), allocator
fragmentation and the CUDA context.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import numbers
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from lowbit.errors import UsageError, check_given, choose
from lowbit.formats import get as get_format
from lowbit.memory.breakdown import Breakdown
from lowbit.models.causal_lm import config_positions
from lowbit.nn.convert import recipe_for_model
from lowbit.nn.experts import is_experts
from lowbit.nn.layer_kinds import is_linear
from lowbit.optim.states import (
    ADAM_STATES,
    BLOCK_SIZE,
    SMALL_TENSOR_NUMEL,
    STEP_BYTES,
    StatePrecision,
    adam_state_bytes,
    keeps_fp32_states,
    state_precision,
    state_tensor_bytes,
)
from lowbit.recipes import Recipe, UpdateRounding, get_recipe
from lowbit.recipes.recipe import DTYPES, Scaling, block_indices, dtype_of

SHARDING = ("none", "ddp", "fsdp")  # ddp: `lowbit train --strategy ddp`, no sharding
TASKS = ("causal-lm", "token-classification")  # the trainer's tasks whose models the trace builds
# Nominal memory of common accelerators, GiB: RTX 4090 / A10 (24), A100-40GB (40),
# A100/H100-80GB (80), H200 (141).
ACCELERATORS_GIB = (24, 40, 80, 141)
RESERVE = 0.05  # left free for the CUDA context, allocator fragmentation and workspace


@dataclass(frozen=True)
class ModelShape:
    """What the estimator needs of a model besides its forward: parameter sizes and positions."""

    name: str
    param_numels: tuple[int, ...]  # every parameter tensor (tied ones once)
    param_rows: tuple[int, ...]  # their sizes along dim 0, which FSDP2 shards
    block_numel: int  # parameters of the largest block (what FSDP gathers per block)
    outside_numel: int  # parameters outside the blocks (FSDP's root: embeddings, head)
    max_positions: int  # 0: no limit (ALiBi)

    @property
    def num_params(self) -> int:
        return sum(self.param_numels)


def load_model_config(config_or_size, task: str = "causal-lm"):
    """``(transformers config, model name)`` of a named size, a ``--model`` folder or config, or a
    run folder (its saved settings), without building the model. A token classifier's labels are
    the run folder's, or for a folder or config.json the built-in task's, as `lowbit train`
    without --data trains it; a ``PretrainedConfig`` keeps its own (the caller set them)."""
    from transformers import PretrainedConfig

    from lowbit.models import list_sizes, model_config
    from lowbit.models.pretrained import load_config, run_folder_above

    if isinstance(config_or_size, PretrainedConfig):
        return config_or_size, getattr(config_or_size, "name_or_path", "") or "config"
    if not isinstance(config_or_size, (str, os.PathLike)):
        # a model itself read as a path: "[Errno 36] File name too long: 'LlamaForCausalLM(...'"
        own = isinstance(getattr(config_or_size, "config", None), PretrainedConfig)
        raise UsageError(
            f"the model to estimate is a {type(config_or_size).__name__}, not a named size, a "
            "path or a transformers config; fix: "
            + ("its config, estimate(model.config, ...)" if own else "one of those")
        )
    # "" as a path is the current folder, read as the model or run folder meant (the CLI's
    # --model "" is refused before, by its flag's name)
    check_given(
        config_or_size,
        "the model to estimate",
        "give a size, a config.json or its folder, or a run folder",
    )
    text = str(config_or_size)
    if task == "token-classification" and text == "minilm":
        from lowbit.models.token_classifier import _resolve

        text = str(_resolve(text))  # `lowbit train --model minilm`'s folder, as it trains it
    if text in list_sizes():
        if task != "causal-lm":
            raise UsageError(
                f"the named sizes are causal LMs; fix: give the {task} model's config.json "
                "or checkpoint folder, or a lowbit run folder that trained it (a tagger's size "
                "depends on its data's words and tags)"
            )
        return model_config(text), text
    path = Path(text)
    from lowbit.train.config import is_run_folder

    if is_run_folder(path):
        return _run_config(path, task)
    if path.is_dir():
        path = path / "config.json"
    # a run's file or folder (a checkpoint, checkpoints/, config.yaml) is no model, its run is
    not_a_config = not path.is_file() or path.name != "config.json"
    if not_a_config and (run := run_folder_above(Path(text))) is not None:
        raise UsageError(
            f"{text}: inside the lowbit run folder {run}, not a model; fix: --model {run} (that "
            "run's model and settings)"
        )
    if not path.is_file():
        raise UsageError(_no_model_at(Path(text), list_sizes()))
    config = load_config(path)  # a config.json transformers rejects: one line
    if task == "token-classification":
        # the head `lowbit train --model DIR` builds on the built-in task: one output per tag of
        # its data, not the config's own labels (a default BertConfig's 2 estimated 2 of its 11)
        from lowbit.data.syntax_tags import LABELS

        _with_labels(config, LABELS)
    return config, str(path)


def _with_labels(config, labels) -> None:
    """Give ``config`` one output per label (`lowbit.models.token_classifier`'s head)."""
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}


def _hub_name(given: Path) -> bool:
    """Whether the missing path ``given`` reads as a Hugging Face Hub name (``owner/model``, as
    ``meta-llama/Llama-2-7b-hf``), not as a mistyped path: no file suffix of a config or
    checkpoint, and no folder here named as its owner (``runs/typo``)."""
    return (
        re.fullmatch(r"[\w.-]+/[\w.-]+", str(given)) is not None
        and given.suffix not in (".json", ".yaml", ".yml", ".pt", ".safetensors")
        and not Path(given.parts[0]).exists()
    )


def _no_model_at(given: Path, sizes) -> str:
    """Why ``--model`` names no model, and the fix: a mistyped path, a Hugging Face Hub name, a
    `lowbit compare` folder (whose runs are run folders), a folder of runs (``runs/``), or a
    folder without a config.json. One message for all read "is neither a model size nor a
    config.json" of a compare folder, and of a missing ``x/config.json``, with a fix that left out
    the run folders that --model takes; a Hub name was "nothing at that path" until session 36."""
    from lowbit.report.compare import SETTINGS
    from lowbit.train.config import is_run_folder

    fix = "fix: a size name, a Hugging Face config.json or its folder, or a lowbit run folder"
    if not given.exists() and _hub_name(given):  # the estimate needs its config.json only
        return (
            f"{given}: nothing at that path, and lowbit reads no Hugging Face Hub names, only "
            f"local files; fix: hf download {given} config.json --local-dir DIR (the config is "
            "all an estimate needs), then --model DIR"
        )
    if not given.exists():
        return f"{given}: nothing at that path, nor a model size ({', '.join(sizes)}); {fix}"
    if (given / SETTINGS).is_file() and (given / "runs").is_dir():
        run = next(iter(sorted((given / "runs").glob("*/seed-*"))), None)
        example = f" such as {run}" if run else ""
        return f"{given}: a lowbit compare study, not one run; fix: one of its runs{example}"
    with contextlib.suppress(OSError):  # a folder that cannot be listed: the message below
        if runs := sorted(p for p in given.iterdir() if is_run_folder(p)):
            fix = f"fix: one of them, such as {runs[0]}"
            return f"{given}: a folder of lowbit runs, not one run; {fix}"
    return f"{given}: holds no config.json, and is no lowbit run folder; {fix}"


def _no_cnn_estimate(run_dir: Path | None = None) -> UsageError:
    """The refusal of the image-classification CNN (of ``run_dir``, a CNN's run folder), which
    `lowbit train` measures instead: its summary's memory table, measured at step 2. A run folder
    was refused with "fix: a run of one of causal-lm, token-classification" until session 36."""
    import shlex

    traced = "the estimator traces transformers models (causal-lm, token-classification)"
    if run_dir is None:
        return UsageError(
            f"{traced}, not the image-classification CNN; fix: measure a short run (lowbit train "
            "--task image-classification --steps 2 prints its memory by component)"
        )
    config = shlex.quote(str(Path(run_dir) / "config.yaml"))
    return UsageError(
        f"{run_dir}: an image-classification run, and {traced}, not its CNN; fix: the memory "
        "table its lowbit train printed (measured at step 2), or measure it again: lowbit train "
        f"--config {config} --steps 2 --out DIR"
    )


def _run_config(run_dir: Path, task: str):
    """(config, name) of the model a lowbit run folder trained: a named size with the run's own
    vocabulary (its saved tokenizer; a tagger's vocab.json and labels.json, as the trainer builds
    it), else its ``--model``. A run of another task is refused: its model is not ``task``'s."""
    from lowbit.models import build_token_classifier, model_config
    from lowbit.models.causal_lm import SIZES as LM_SIZES
    from lowbit.models.token_classifier import SIZES as TAGGER_SIZES
    from lowbit.train.config import read, with_recorded_data

    run = with_recorded_data(run_dir, read(run_dir))  # a relative --model, as the run named it
    if run.task == "image-classification":
        raise _no_cnn_estimate(run_dir)
    if run.task != task:
        fix = f"--task {run.task}" if run.task in TASKS else f"a run of one of {', '.join(TASKS)}"
        raise UsageError(f"{run_dir}: the run's task is {run.task}, not {task}; fix: {fix}")
    if task == "causal-lm" and run.model in LM_SIZES:
        from lowbit.data import build_tokenizer
        from lowbit.train.tasks import causal_lm_tokenizer

        # the tokenizer saved with the run; a byte tokenizer's ids are the same without it
        saved = (run_dir / "tokenizer").is_dir() or run.tokenizer != "byte"
        tokenizer = causal_lm_tokenizer(run, run_dir, None) if saved else build_tokenizer("byte")
        return model_config(run.model, tokenizer.vocab_size), str(run_dir)
    _check_model_there(run_dir, run.model, (*LM_SIZES, *TAGGER_SIZES, "minilm"))
    if task == "causal-lm":
        return load_model_config(run.model, task)
    if not (run_dir / "labels.json").is_file():
        raise UsageError(f"{run_dir}: no labels.json; fix: restore the run's labels.json")
    labels = json.loads((run_dir / "labels.json").read_text(encoding="utf-8"))
    if run.model in TAGGER_SIZES:
        from lowbit.data.syntax_tags import WordVocab

        vocab = WordVocab.load(run_dir / "vocab.json")  # a missing one: a one-line error
        with FakeTensorMode():  # shapes only
            model = build_token_classifier(run.model, labels, vocab_size=len(vocab))
        return model.config, str(run_dir)
    # a pretrained encoder with the run's head: one output per tag, not the checkpoint's own
    # labels (`lowbit.models.token_classifier`)
    config, name = load_model_config(run.model, task)
    _with_labels(config, labels)
    return config, name


def _check_model_there(run_dir: Path, model: str, names) -> None:
    """Refuse a run whose --model folder (not one of ``names``) is gone, naming the run: it was
    "nothing at that path, nor a model size; fix: a size name, ..." of a path the user never
    typed."""
    from lowbit.models.pretrained import GONE

    if model not in names and not Path(model).exists():
        raise UsageError(
            f"{run_dir}: the model the run trained from, {model}, is gone ({GONE}); fix: put it "
            "back there, or --model its new place with the run's settings as flags"
        )


def build_planned_model(config, name: str, dtype: torch.dtype, task: str):
    """The ``task``'s model of ``config`` (``AutoModelForCausalLM``, or
    ``AutoModelForTokenClassification`` with the config's labels) with parameters in ``dtype``
    (on fake tensors inside a ``FakeTensorMode``), with SDPA attention where the architecture has
    it, as `lowbit train` loads it. ``config`` itself is left as it was (transformers writes the
    dtype into it)."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, PreTrainedModel

    from lowbit.models.causal_lm import _as_decoder, is_causal_lm, not_causal
    from lowbit.models.pretrained import BUILD_ERRORS, with_sdpa

    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForTokenClassification
    architectures = getattr(config, "architectures", None) or []
    if task == "causal-lm" and architectures and not is_causal_lm(architectures, config.model_type):
        # as `lowbit train` refuses it (`load_causal_lm`), in the same words
        folder = Path(name).parent if Path(name).name == "config.json" else Path(name)
        raise not_causal(name, config, folder)

    def build(**kw):  # a fresh copy per attempt: a failed SDPA attempt leaves its choice in it
        # Fake tensors hold no values to initialize, and some initializers read them (torch's
        # trunc_normal_, ModernBERT's, tests ``mask.any()``: a DataDependentOutputException that
        # ended `lowbit train` at its memory report), so the weight initialization is skipped;
        # weight tying, which decides which parameters are one, still runs.
        with mock.patch.object(PreTrainedModel, "initialize_weights", lambda self: None):
            built = copy.deepcopy(config)
            # an encoder's causal LM as `lowbit train` builds it: a decoder (its attention mask)
            built.update(_as_decoder(config) if task == "causal-lm" else {})
            return auto.from_config(built, dtype=dtype, **kw)

    try:
        return with_sdpa(build)
    except ValueError as error:
        first = str(error).splitlines()[0]
        kind = "causal language model" if task == "causal-lm" else "token-classification"
        raise UsageError(
            f"{name}: not a {kind} config ({first}); "
            f"fix: give the config.json of a model {auto.__name__} can build"
        ) from None
    except BUILD_ERRORS as error:
        raise UsageError(
            f"{name}: transformers cannot build a model from this config "
            f"({type(error).__name__}: {error}); fix: correct the config's fields"
        ) from None


def _blocks(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The model's outermost numbered blocks by name (`block_stacks`: a decoder's layers)."""
    modules = dict(model.named_modules())
    names = (
        f"{stack}.{i}".lstrip(".") for stack, found in block_indices(modules).items() for i in found
    )
    return {name: modules[name] for name in names}


def model_shape(model: torch.nn.Module, config, name: str) -> ModelShape:
    blocks = _blocks(model)
    inside = {id(p) for b in blocks.values() for p in b.parameters()}
    return ModelShape(
        name=name,
        param_numels=tuple(p.numel() for p in model.parameters()),
        param_rows=tuple(p.shape[0] if p.dim() else 1 for p in model.parameters()),
        block_numel=max(
            (sum(p.numel() for p in b.parameters()) for b in blocks.values()), default=0
        ),
        outside_numel=sum(p.numel() for p in model.parameters() if id(p) not in inside),
        max_positions=config_positions(config) or 0,
    )


def _bytes(dtype_name: str) -> int:
    return DTYPES[dtype_name].itemsize


def _layer_input_bytes(recipe: Recipe, name: str, hp_bytes: int) -> tuple[float, float, bool]:
    """For the linear called ``name``: (bytes per saved input value, bytes per weight value of the
    saved quantized weight copy, whether the input is quantized per layer)."""
    spec, _ = recipe.layer_for(name)
    if spec is None or spec.is_identity:
        return hp_bytes, 0.0, False
    from lowbit.nn.linear import reused_operands

    reused = reused_operands(spec)
    x_bits = get_format(spec.forward.a.format).bits
    w_bits = get_format(spec.forward.b.format).bits
    reuse_x, reuse_w = "grad_weight.x" in reused, "grad_input.w" in reused
    return (x_bits / 8 if reuse_x else hp_bytes), (w_bits / 8 if reuse_w else 0.0), reuse_x


def _kept_input_dtype(recipe: Recipe, name: str) -> torch.dtype | None:
    """The dtype a converted linear keeps its input in for a weight gradient of plain casts
    (int8's bf16), one cast shared by the layers that read the input (`lowbit.nn.linear`'s
    `_kept_input`); None where it keeps something else."""
    spec, _ = recipe.layer_for(name)
    if spec is None or spec.is_identity:
        return None
    from lowbit.nn.linear import LayerState

    state = LayerState(spec)
    dtypes = state.cast_gemms.get("grad_weight")
    return None if dtypes is None or state.reuse_x else dtypes[1]


def _as_in_a_real_run(grouped_linear=None) -> contextlib.ExitStack:
    """A context in which transformers decides as it does on real tensors where it would read
    values that fake tensors do not have, or pick a kernel fake tensors refuse:

    - packed sequences (positions restarting inside a row) are found by reading the position ids;
      on fake tensors transformers assumes packing and builds an explicit attention mask per layer
      that the real run (positions 0..seq-1 in every row) does not build, and SDPA saves it. The
      trainer's batches are never packed, so the trace says so.
    - mixture-of-experts layers multiply by ``torch._grouped_mm``, whose fake kernel takes bf16
      only (its CPU kernel takes fp32 too); transformers' own fallback op saves the same tensors
      (a layer's input and expert weights) and has a fake kernel for every dtype.

    Each patch applies only where this transformers has the function (older ones do neither).
    ``grouped_linear(original, *args, **kwargs)``, if given, wraps each grouped expert GEMM (the
    trace's accounting of converted experts).
    """
    from transformers import masking_utils

    stack = contextlib.ExitStack()
    if hasattr(masking_utils, "find_packed_sequence_indices"):
        stack.enter_context(
            mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda *a, **k: None)
        )
    try:
        from transformers.integrations import moe
    except ImportError:
        return stack
    if hasattr(moe, "_can_use_grouped_mm"):
        stack.enter_context(mock.patch.object(moe, "_can_use_grouped_mm", lambda *a, **k: False))
    if grouped_linear is not None and hasattr(moe, "_grouped_linear"):
        original = moe._grouped_linear
        wrapped = functools.partial(grouped_linear, original)
        stack.enter_context(mock.patch.object(moe, "_grouped_linear", wrapped))
    return stack


class _CpuLayerNormStatistics(TorchDispatchMode):
    """Layer norm's saved statistics in the dtype the CPU kernel gives them. For a bf16 or fp16
    input with fp32 weight or bias (a mixed-type layer norm: ELECTRA's and ModernBERT's under
    bf16 autocast) the kernel computes and returns the mean and 1/std in fp32 (ATen's
    ``layer_norm_cpu``, ``param_scalar_type``), where the fake kernel keeps the input's dtype:
    2 bytes short per value, which the backward saves (the estimate was 0.1-0.3% short)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.native_layer_norm.default:
            x, _, weight, bias, _ = args  # (input, normalized_shape, weight?, bias?, eps)
            fp32_params = any(p is not None and p.dtype == torch.float32 for p in (weight, bias))
            if x.dtype in (torch.bfloat16, torch.float16) and fp32_params:
                normed, mean, rstd = out
                return normed, mean.float(), rstd.float()
        return out


@contextlib.contextmanager
def _quiet_fake_tensor_errors():
    """FakeTensorMode logs a traceback for an op it cannot run before raising; the estimator
    turns the error into one line (`_trace_activations`), so the log is only noise."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def splits_state_blocks(shape: ModelShape, precision, gpus: int) -> bool:
    """Whether FSDP over ``gpus`` ranks gives a rank a shard of some parameter that is not whole
    blocks of its quantized Adam states, which lowbit's optimizer refuses at the first step
    (`lowbit.optim.adamw`: torchao's blocks cannot straddle two ranks). FSDP2 shards along dim 0
    as ``torch.chunk`` does: ``ceil(rows / gpus)`` rows per rank, the last rank's the rest."""
    block = BLOCK_SIZE.get(precision)
    if block is None:
        return False
    for numel, rows in zip(shape.param_numels, shape.param_rows, strict=True):
        if keeps_fp32_states(precision, numel):  # decided on the whole tensor: no blocks
            continue
        chunk = -(-rows // gpus)
        last = rows - (-(-rows // chunk) - 1) * chunk
        if (chunk * numel // rows) % block or (last * numel // rows) % block:
            return True
    return False


def rank_counts_keeping_state_blocks(
    shape: ModelShape, precision, ranks: int, global_batch: int | None = None
) -> list[int]:
    """The (at most two) rank counts nearest ``ranks`` whose FSDP shards keep the blocks of
    quantized optimizer states whole (`splits_state_blocks`) and, given a ``global_batch``
    (`lowbit train`'s --batch-size, which its ranks split), that divide it: what to suggest
    instead. Without the batch, "2 or 4" was offered for a batch of 6, and 4 then refused."""
    fitting = [
        n
        for n in range(2, 4 * ranks + 1)
        if (global_batch is None or global_batch % n == 0)
        and not splits_state_blocks(shape, precision, n)
    ]
    return sorted(sorted(fitting, key=lambda n: abs(n - ranks))[:2])


def _state_blocks_note(
    shape: ModelShape, precision, gpus: int, global_batch: int | None = None
) -> str:
    """One line for an FSDP run over ``gpus`` ranks that splits quantized state blocks, naming
    the nearest device counts that do not and split ``global_batch`` where it is given
    (`rank_counts_keeping_state_blocks`); "" where none is split."""
    if not splits_state_blocks(shape, precision, gpus):
        return ""
    nearest = rank_counts_keeping_state_blocks(shape, precision, gpus, global_batch)
    counts = f"--gpus {' or '.join(map(str, nearest))}, or " if nearest else ""
    return (
        f"fsdp over {gpus} GPUs splits the {BLOCK_SIZE[precision]}-value blocks of "
        f"{precision.value} {SPLIT_STATE_BLOCKS}, which lowbit train refuses; fix: {counts}"
        "--optimizer-state fp32 or bf16"
    )


# In the note of an FSDP estimate whose shards split quantized optimizer-state blocks
SPLIT_STATE_BLOCKS = "optimizer states across ranks"

# The note of an estimate asked for activation checkpointing of a model that does not support it
NOT_CHECKPOINTABLE = (
    "activation checkpointing: this model does not support it (lowbit train refuses it); "
    "estimated without"
)


class _SharedSlot:
    """One slot of `lowbit.nn.operand.SharedQuantization` on the trace's fake tensors: whether a
    layer's quantization of its input is the one the layer before it made (the same tensor, the
    same quantization, a layer that has not had it yet), or its own, which the slot then holds.
    A slot holds the last quantization only: layers share it when they read one tensor one after
    another (q, k and v; gate and up), as the run does."""

    def __init__(self):
        self.key: tuple | None = None
        self.readers: set[int] = set()

    def reused(self, x: torch.Tensor, quantization, layer, shares: bool) -> bool:
        """Whether ``layer`` reuses the slot's quantization of ``x``; ``shares``: whether the run
        shares this one (an unshared quantization leaves the slot as it was)."""
        if not shares:
            return False
        storage = x.untyped_storage()
        key = (storage._cdata, x.storage_offset(), x.shape, x.stride(), x.dtype, x._version)
        key = (*key, quantization)
        if key == self.key and id(layer) not in self.readers:
            self.readers.add(id(layer))
            return True
        self.key, self.readers = key, {id(layer)}
        return False


@dataclass
class Trace:
    """Bytes one forward and loss save for the backward (`_trace_activations`): activations, and
    temporary copies of weights (autocast's casts, converted layers' quantized weights); each
    also by the block it is saved in."""

    activations: float = 0.0
    temporaries: float = 0.0
    # whether transformers can checkpoint the model's blocks (`lowbit train` refuses it otherwise)
    checkpointable: bool = True
    block_activations: dict[str, float] = field(default_factory=dict)
    block_temporaries: dict[str, float] = field(default_factory=dict)
    # what each block's checkpoint keeps for its recompute: its positional tensor arguments (a
    # non-reentrant checkpoint saves them for the backward; BERT's attention mask too), by storage
    checkpoint_inputs: dict[str, dict[int, int]] = field(default_factory=dict)
    # where the forward saved a storage first: "" outside the blocks, or a block's name
    saved_in: dict[int, str] = field(default_factory=dict)
    # (numel, rows along dim 0) of the parameters the loss reaches (`_reached_parameters`),
    # which alone get gradients
    trained: tuple[tuple[int, int], ...] = ()
    # what `lowbit train` warns of the recipe on this model (`_conversion_notes`)
    conversion_notes: tuple[str, ...] = ()
    # elements of the logits the loss reads (batch x seq x vocabulary or labels)
    logits_numel: int = 0

    def checkpointed(self) -> tuple[float, float]:
        """(activations, temporaries) with one checkpoint per block: what lies outside the
        blocks, every block's checkpointed inputs, and one block's saved tensors while its
        backward recomputes them (the largest block's). Each storage once: an input saved outside
        the blocks is counted there already, an input shared by the blocks (an attention mask)
        is kept once, and a block that saves a kept input itself (its first norm saves the
        hidden states) recomputes the tensor the checkpoint keeps."""
        kept = {key: n for inputs in self.checkpoint_inputs.values() for key, n in inputs.items()}
        inside = sum(self.block_activations.values())
        inputs = sum(n for key, n in kept.items() if self.saved_in.get(key) != "")
        activations = self.activations - inside + inputs
        temporaries = self.temporaries - sum(self.block_temporaries.values())

        def recomputed(block: str) -> float:
            again = sum(n for key, n in kept.items() if self.saved_in.get(key) == block)
            return self.block_activations[block] - again

        largest = max(self.block_activations, key=recomputed)
        return (
            activations + recomputed(largest),
            temporaries + self.block_temporaries[largest],
        )


# fp32 copies of the logits' gradient live at once in cross-entropy's backward (module docstring)
LOGITS_GRADIENT_COPIES = 2


def _forward_and_loss(model, task: str, batch: int, seq: int) -> tuple[torch.Tensor, int]:
    """The trainer's forward and loss of ``task`` (`lowbit.train.tasks`) on a batch of zeros, and
    the number of elements of the logits."""
    if task == "causal-lm":
        windows = torch.zeros(batch, seq + 1, dtype=torch.long)  # as `LMBatches` cuts them
        ids, labels = windows[:, :-1], windows[:, 1:]
        logits = model(input_ids=ids, use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()), logits.numel()
    # Token classification: padded sentences with their attention mask (on fake tensors
    # transformers always builds the mask SDPA then saves; a real batch with padding does too).
    ids, mask, labels = (torch.zeros(batch, seq, dtype=torch.long) for _ in range(3))
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    return loss, logits.numel()


def _trace_activations(
    model,
    mode,
    recipe: Recipe,
    batch: int,
    seq: int,
    task: str = "causal-lm",
    alone: bool = True,
) -> Trace:
    """Run the trainer's forward and loss of ``model`` (built in the fake-tensor ``mode``) for
    ``batch x seq`` tokens with ``recipe``'s parameter dtype and autocast, and sum what it saves
    for the backward (see the module docstring); ``recipe`` resolved for the model's names.
    ``alone``: one process, whose layers share quantized inputs; ranks that agree on scales do not
    (`lowbit.nn.operand.SharedQuantization`)."""
    from lowbit.memory.measure import is_parameter_cast
    from lowbit.nn.linear import gemm_output_dtype

    autocast = recipe.autocast is not None
    hp_bytes = _bytes(recipe.autocast or recipe.param_dtype)
    seen = {p.untyped_storage()._cdata for p in model.parameters()}
    trace = Trace(checkpointable=getattr(model, "supports_gradient_checkpointing", False))
    where: dict = {"block": None, "converted": False, "experts": None}

    def count(nbytes: float, temporary: bool = False) -> None:
        if temporary:
            trace.temporaries += nbytes
        else:
            trace.activations += nbytes
        if where["block"] is not None:
            per_block = trace.block_temporaries if temporary else trace.block_activations
            per_block[where["block"]] += nbytes

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if not where["converted"] and key not in seen:
            seen.add(key)
            trace.saved_in[key] = where["block"] or ""
            count(t.untyped_storage().nbytes(), temporary=is_parameter_cast(t))
        return t

    # the forward's shared quantizations of layer inputs, as `SharedQuantization` holds them
    quantized_inputs, input_casts = _SharedSlot(), _SharedSlot()
    held_inputs: list = []  # the inputs converted layers keep as they came

    def enter_gemm(
        name: str, x, weight, quantization_shared=False, cast_shared=lambda: False
    ) -> None:
        """Count what the converted GEMM of the layer ``name`` keeps for its backward: of its input
        ``x`` for the weight gradient a cast (int8's bf16), else its quantization, else ``x``
        itself as it came (autocast casts no input of lowbit's autograd function), once per
        storage; and its quantized ``weight`` as a temporary. ``quantization_shared``: a layer
        before kept this quantization of ``x``; ``cast_shared()``, asked only where a cast is
        kept: one before kept this cast (`_SharedSlot.reused`, which records it)."""
        x_bytes, w_bytes, quantized = _layer_input_bytes(recipe, name, hp_bytes)
        kept_dtype = None if quantized else _kept_input_dtype(recipe, name)
        if kept_dtype is not None and x.dtype != kept_dtype:
            if not cast_shared():
                count(kept_dtype.itemsize * x.numel())
        elif quantized:
            if not quantization_shared:
                count(x_bytes * x.numel())
        elif (key := x.untyped_storage()._cdata) not in seen:
            seen.add(key)
            trace.saved_in[key] = where["block"] or ""  # a checkpoint keeps it too
            count(x.untyped_storage().nbytes())
            # held as the run's backward holds it: the traced layer saves its autocast cast
            # instead, and a freed storage's key, reused, hid the next tensor saved there
            held_inputs.append(x)
        count(w_bytes * weight.numel(), temporary=True)
        where["converted"] = True

    def enter_converted(name: str):
        spec, _ = recipe.layer_for(name)
        x_quantization = (spec.forward.a, spec.forward.transform)
        # a delayed scale is a tensor on the GPU, which `SharedQuantization` does not read back
        shares_x = alone and spec.forward.a.scaling is not Scaling.DELAYED

        def hook(module, args):
            x = args[0]
            # every converted layer quantizes its input through the slot, kept or not; one
            # quantization or cast of an input for the layers that read it
            shared = quantized_inputs.reused(x, x_quantization, module, shares_x)
            enter_gemm(
                name,
                x,
                module.weight,
                quantization_shared=shared,
                cast_shared=lambda: input_casts.reused(x, spec.grad_weight.b, module, alone),
            )

        return hook

    def leave_converted(module, args, output):
        where["converted"] = False

    checkpointed: list = []  # every block's inputs

    def enter_block(name: str):
        def hook(module, args, kwargs):
            # the positional tensors, as transformers' checkpoint passes them (its keyword
            # arguments stay in the recompute's closure, unsaved); else the hidden states
            inputs = [t for t in args if torch.is_tensor(t)] or [
                next(t for t in kwargs.values() if torch.is_tensor(t))
            ]
            trace.checkpoint_inputs[name] = {
                t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in inputs
            }
            checkpointed.extend(inputs)  # alive to the trace's end, so no key is reused
            trace.block_activations[name] = trace.block_temporaries[name] = 0.0
            where["block"] = name

        return hook

    def leave_block(module, args, output):
        where["block"] = None

    def enter_experts(name: str):
        def hook(module, args):
            where["experts"] = name

        return hook

    def leave_experts(module, args, output):
        where["experts"] = None

    def grouped_linear(original, x, weight, *args, **kwargs):
        """A converted mixture-of-experts layer's grouped GEMM (every expert's at once): its
        input and weights as the layer keeps them (`lowbit.nn.experts`), not as the op saves,
        and its output in the dtype a converted GEMM gives (`lowbit.nn.linear`: the autocast
        dtype, else the input's), where transformers' op gives the weight's. Until session 39
        the input was counted in the autocast dtype and the output left in fp32: a small
        Mixtral's fp8-rowwise activations read 23% over the measured bytes (docs/memory.md)."""
        name = where["experts"]
        if name is None:
            return original(x, weight, *args, **kwargs)
        enter_gemm(name, x, weight)  # each expert GEMM's own quantization or cast of its input
        try:
            out = original(x, weight, *args, **kwargs)
        finally:
            where["converted"] = False
        return out.to(gemm_output_dtype(x))

    handles = []
    in_fp32 = contextlib.ExitStack()
    for name, module in model.named_modules():
        if is_experts(module):
            spec, _ = recipe.layer_for(name)
            enter, leave = enter_experts, leave_experts
        else:
            spec, _ = recipe.layer_for(name) if is_linear(module) else (None, "")
            enter, leave = enter_converted, leave_converted
            if spec is not None and spec.is_identity:
                in_fp32.enter_context(_computed_in_fp32(module))
        if spec is not None and not spec.is_identity:
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave))
    for name, block in _blocks(model).items():
        handles.append(block.register_forward_pre_hook(enter_block(name), with_kwargs=True))
        handles.append(block.register_forward_hook(leave_block))
    model.train()
    try:
        with (
            in_fp32,
            _as_in_a_real_run(grouped_linear),
            _quiet_fake_tensor_errors(),
            mode,
            _CpuLayerNormStatistics(),
            torch.autocast("cpu", dtype=dtype_of(recipe.autocast), enabled=autocast),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            loss, trace.logits_numel = _forward_and_loss(model, task, batch, seq)
        trace.trained = _reached_parameters(loss)
        del loss  # kept alive until here: its graph holds the saved tensors, so no key is reused
    except (RuntimeError, NotImplementedError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(
            f"cannot trace this architecture's forward on fake tensors ({first}); "
            "fix: measure a short run instead (`lowbit train` prints its memory by component)"
        ) from None
    finally:
        for handle in handles:
            handle.remove()
    return trace


def _computed_in_fp32(linear: torch.nn.Module):
    """A context in which ``linear`` computes as the layer `convert` makes of it for a spec of
    fp32 operands (an override ``PATTERN=fp32``): in fp32 under autocast too, from an fp32 cast of
    its input and, for 16-bit parameters, of its weight, which the backward keeps
    (`lowbit.nn.linear.full_precision`). Traced as it was, the layer ran in the recipe's autocast
    dtype: ``lm_head=fp32`` under bf16-mixed read as bf16-mixed itself (8 KiB short of the
    measured activations of `nano`, 32 KiB over its temporaries), and ``model.layers.0.*=fp32``
    under bf16-low counted none of the fp32 weight copies the run keeps."""
    from lowbit.nn.layer_kinds import is_conv1d
    from lowbit.nn.linear import full_precision

    def forward(x):
        weight = linear.weight.t() if is_conv1d(linear) else linear.weight  # Conv1D: in x out
        return full_precision(F.linear, x, weight, linear.bias)

    return mock.patch.object(linear, "forward", forward)


def _reached_parameters(loss: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """(numel, rows along dim 0, which FSDP2 shards) of the parameters ``loss``'s graph reaches
    (each once). Only these get a gradient,
    and so master weights and optimizer states: a text batch through Gemma 3's multimodal model
    leaves its vision tower without any, which the estimate counted as trained (1.5x the
    gradients the run holds in a small one)."""
    numels, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # an AccumulateGrad node: a leaf parameter
        if variable is not None:
            numels.append((variable.numel(), variable.shape[0] if variable.dim() else 1))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return tuple(numels)


_TRACES: dict = {}  # (config, recipe, batch, seq, ...) -> `_traced`'s result; a few KB each


def _gathered_dtype(recipe: Recipe) -> str:
    """The dtype FSDP gathers parameters in on a GPU (`lowbit.distributed.fsdp`'s policy)."""
    return recipe.autocast or recipe.param_dtype


def _traced(
    config, name: str, recipe: Recipe, batch: int, seq: int, task: str, fsdp: bool, alone: bool
):
    """(`ModelShape`, ``recipe`` resolved for the model's names, `Trace`), remembered: `fits` and
    `lowbit estimate` ask for the same model and batch several times. ``fsdp``: the parameters
    are FSDP's gathered ones, in `_gathered_dtype`; ``alone``: one process (`_trace_activations`)."""
    key = (config.to_json_string(), name, recipe, batch, seq, task, fsdp, alone)
    param_dtype = _gathered_dtype(recipe) if fsdp else recipe.param_dtype
    if recipe.emulate_fp16_gemms_on_cpu:  # a GPU computes these GEMMs in fp16 natively
        recipe = replace(recipe, layer=None)  # (autocast, or fp16 parameters), as `Precision`
    if key not in _TRACES:
        mode = FakeTensorMode()
        with mode:
            model = build_planned_model(config, name, dtype_of(param_dtype), task)
        shape = model_shape(model, config, name)
        if shape.max_positions and seq > shape.max_positions:
            raise UsageError(
                f"sequence length {seq} exceeds the model's {shape.max_positions} positions; "
                f"fix: --seq {shape.max_positions} or less"
            )
        resolved = recipe_for_model(recipe, model)
        if len(_TRACES) >= 32:
            _TRACES.clear()
        trace = _trace_activations(model, mode, resolved, batch, seq, task, alone)
        trace.conversion_notes = _conversion_notes(resolved, model, mode)
        _TRACES[key] = (shape, resolved, trace)
    return _TRACES[key]


def _conversion_notes(recipe: Recipe, model: torch.nn.Module, mode) -> tuple[str, ...]:
    """What `lowbit train` warns of ``recipe`` (resolved for ``model``) on this model, said by
    the estimate too, which until session 37 gave a recipe that converts no layer of the model
    the numbers of its compute dtype without a word: a recipe that keeps every GEMM layer in high
    precision (nvfp4's end blocks on a 2-block model; `Precision.keeps_every_layer`), and the
    user's overrides that apply to no layer (a misspelt or shadowed pattern); and the plan an
    ``auto`` recipe is estimated at: a run's (`at_plan`, session 38), else the one it starts
    from (until session 37 said in docs/memory.md only).
    Both warnings come from `convert`'s own report on the traced fake model (in its ``mode``;
    the trace is done with it), so that the note and the warning cannot disagree."""
    from lowbit.nn.convert import convert
    from lowbit.recipes.auto import budget_of, plan_of

    with mode:
        report = convert(model, recipe)
    notes = []
    if recipe.layer is not None and report.kept_every_layer:
        notes.append(
            "the recipe keeps every GEMM layer of this model in high precision (lowbit train "
            "warns of it too), so it trains, and is estimated, as its compute dtype does"
        )
    elif plan_of(recipe) is not None:  # a run's plan (`at_plan`: `lowbit estimate RUN`)
        notes.append(_plan_note(recipe, report, model))
    elif budget_of(recipe) is not None:  # docs/memory.md: its cheaper rungs save less
        notes.append(
            "auto is estimated at the plan it starts from, every converted layer in bf16: the "
            "most it holds (its fp8 and MX rungs save a quantized or bf16 input and at most a "
            "1-byte weight copy)"
        )
    notes += [report.unused_override_line(text) for text in report.unused_overrides]
    return tuple(notes)


def _plan_note(recipe: Recipe, report, model: torch.nn.Module) -> str:
    """Which ``auto`` plan (`at_plan`) ``recipe`` is estimated at, and the plan's layers that
    match no GEMM layer the conversion ``report`` found, nor a low-precision layer of the
    converted ``model`` (a metrics.jsonl of another model, or edited): those stay at the start,
    in bf16. Until session 38 such a plan was noted as estimated while none of it applied; until
    session 42 a mixture of experts' GEMMs (``...experts.gemms.up.7``, which the report names as
    their ``...experts`` layer) were noted as matching none, while the plan applied to them."""
    from lowbit.nn.convert import lowbit_layers
    from lowbit.recipes.auto import plan_layers, plan_of

    found = report.converted.keys() | report.kept.keys() | lowbit_layers(model).keys()
    missing = [name for name in plan_layers(recipe) if name not in found]
    shown = ", ".join(missing[:3]) + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
    if len(missing) == len(plan_layers(recipe)):
        return (
            f"the {plan_of(recipe)} names no layer of this model ({shown}): estimated at the "
            "plan it starts from, every converted layer in bf16"
        )
    if missing:
        return (
            f"estimated at the {plan_of(recipe)}; {len(missing)} of its layers match no layer "
            f"of this model ({shown}): those at the start, in bf16"
        )
    return f"estimated at the {plan_of(recipe)}"


def _first_shard(numel: int, rows: int, ranks: int) -> int:
    """Values of the first rank's shard of a parameter of ``numel`` values and ``rows`` along dim
    0 that FSDP2 shards over ``ranks`` (``torch.chunk``: ``ceil(rows / ranks)`` rows; the whole
    tensor for one rank). The first rank holds the most: its master weights and optimizer states
    are of its shard, and every rank's parameters and gradients are padded to that shard's size
    (FSDP2's ``padded_sharded_param_size``). Dividing the model's bytes evenly, as the estimate
    did until session 31, left out the padding of a parameter whose rows do not divide (a
    257-token vocabulary), and the per-tensor step counters and code maps every rank holds."""
    if ranks == 1 or rows == 0:  # a zero-row parameter shards to nothing: whole (empty)
        return numel
    return -(-rows // ranks) * (numel // rows)


def _shard_state_bytes(precision, numel: int, shard: int) -> int:
    """Adam's state of a ``shard`` of a parameter of ``numel`` values: its two moments (fp32 or
    quantized as the *whole* tensor decides, `keeps_fp32_states`), and a step counter and, for
    8-bit and 4-bit states, code maps per tensor, whole on every rank."""
    if shard == numel:
        return adam_state_bytes(precision, numel)
    if keeps_fp32_states(precision, numel):
        moment = 4 * shard
    elif precision is StatePrecision.BF16:
        moment = 2 * shard
    else:  # codes and block scales per value (a shard is whole blocks), a code map per tensor
        one = BLOCK_SIZE[precision] * SMALL_TENSOR_NUMEL  # whole blocks, large enough to quantize
        values = state_tensor_bytes(precision, 2 * one) - state_tensor_bytes(precision, one)
        moment = shard * values // one + state_tensor_bytes(precision, one) - values
    return ADAM_STATES * moment + STEP_BYTES


def check_count(value, name: str) -> None:
    """Refuse ``value`` unless it is a whole number of at least 1 (a batch, a sequence length, a
    device count), naming it ``name``: `estimate`'s argument, or the flag `lowbit estimate` was
    given (``--seq-len``, where "(--seq)" was named whichever the user typed). A float batch
    failed deep in the trace ("zeros() takes 1 positional argument")."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UsageError(
            f"{name} must be a whole number of at least 1, got {value!r}; fix: give 1 or more"
        )


def estimate(
    config_or_size,
    recipe: str | Recipe = "fp32",
    state_precision_name: str = "fp32",
    batch: int = 1,
    seq: int = 1024,
    gpus: int = 1,
    sharding: str = "none",
    activation_checkpointing: bool = False,
    task: str = "causal-lm",
    global_batch: int | None = None,
) -> Breakdown:
    """Memory per device of training ``config_or_size`` (named size, config.json, or a
    ``PretrainedConfig``) with ``recipe``, Adam states in ``state_precision_name``, micro-batch
    ``batch`` x ``seq`` tokens per device, for ``task`` (`TASKS`). ``global_batch``: the batch the
    ``gpus`` split, where it is fixed (a run's --batch-size): the device counts a note suggests
    divide it. See the module docstring for the model."""
    recipe = get_recipe(recipe)
    precision = state_precision(state_precision_name)
    choose("sharding", sharding, SHARDING)
    if task == "image-classification":  # a `lowbit train` task, but no transformers model
        raise _no_cnn_estimate()
    choose("task", task, TASKS)
    for name, value in (("batch", batch), ("seq", seq), ("gpus", gpus)):
        check_count(value, name)
    fsdp = sharding == "fsdp" and gpus > 1  # ddp and fsdp over one GPU shard nothing
    shape, recipe, trace = _traced(
        *load_model_config(config_or_size, task), recipe, batch, seq, task, fsdp, gpus == 1
    )
    p_bytes = _bytes(recipe.param_dtype)
    n = shape.num_params
    ranks = gpus if fsdp else 1
    held = sum(
        _first_shard(k, rows, ranks) for k, rows in zip(shape.param_numels, shape.param_rows)
    )
    # the rest get no gradient, master weight or state
    trained = sum(_first_shard(k, rows, ranks) for k, rows in trace.trained)
    out = Breakdown(num_params=n)
    out.notes.extend(trace.conversion_notes)
    out.parameters = p_bytes * held
    out.gradients = p_bytes * trained
    if recipe.param_dtype != "fp32" and recipe.master_dtype is not None:
        out.master_weights = _bytes(recipe.master_dtype) * trained
    elif recipe.param_dtype != "fp32" and recipe.update_rounding is UpdateRounding.KAHAN:
        out.master_weights = p_bytes * trained
    out.optimizer_states = sum(
        _shard_state_bytes(precision, k, _first_shard(k, rows, ranks)) for k, rows in trace.trained
    )
    ddp = sharding == "ddp" or (sharding == "none" and gpus > 1)  # `lowbit train`'s DDP
    if ddp:  # the module docstring: a second gradient copy, never beside the activations
        out.bucket_rebuild = out.gradients
    if fsdp:
        gathered = _gathered_dtype(recipe)
        out.notes.append(
            f"fsdp: parameters gathered in {gathered}: two blocks (current and prefetched) and "
            "the root's (embeddings, head)"
        )
        fsdp_gather = _bytes(gathered) * (2 * shape.block_numel + shape.outside_numel)
        split = _state_blocks_note(shape, precision, gpus, global_batch)
        if split:
            out.notes.append(split)
    else:
        fsdp_gather = 0.0
    activations, temporaries = trace.activations, trace.temporaries
    if activation_checkpointing and not trace.checkpointable:
        out.notes.append(NOT_CHECKPOINTABLE)
    elif activation_checkpointing and trace.block_activations:
        activations, temporaries = trace.checkpointed()
        out.notes.append("activation checkpointing: one checkpoint per block")
    elif activation_checkpointing:
        out.notes.append("activation checkpointing: the model has no numbered blocks")
    out.activations = round(activations)
    out.temporaries = round(temporaries + fsdp_gather)
    out.logits_gradient = LOGITS_GRADIENT_COPIES * 4 * trace.logits_numel
    if ddp:
        out.notes.append(
            "ddp: peak = model states + max(bucket rebuild, activations + temporaries + logits' "
            f"gradient), set by the {out.peak_set_by}: DDP rebuilds its all-reduce buckets once, "
            "before the second step's forward, holding the old and the new ones (the gradients "
            "twice) for a moment"
        )
    return out


def fits(
    config_or_size,
    recipe: str | Recipe,
    state_precision_name: str,
    seq: int,
    capacity_bytes: float,
    **kw,
) -> int:
    """The largest micro-batch that fits ``capacity_bytes`` (0: not even batch 1). The batch
    grows the activations, temporaries and logits' gradient alone (`Breakdown.step_peak`),
    linearly; what batch 1 fits (the model states, and a DDP rank's bucket rebuild, whatever the
    batch: `Breakdown.total`) bounds nothing more, so the activations' term decides (until
    session 40 the growth of `total` was extrapolated, which a rebuild setting batch 1's peak
    made flat)."""
    one = estimate(config_or_size, recipe, state_precision_name, 1, seq, **kw)
    if one.total > capacity_bytes:
        return 0
    two = estimate(config_or_size, recipe, state_precision_name, 2, seq, **kw)
    step = one.step_peak
    per_sample = two.step_peak - step
    fixed = one.model_states + step - per_sample
    return int((capacity_bytes - fixed) // per_sample) if per_sample > 0 else 1 << 30


def model_state_bytes_per_param(recipe: str | Recipe, state_precision_name: str) -> float:
    """Parameters + gradients + master weights + optimizer states per parameter for a large
    tensor (block scales included; per-tensor step counters and code maps vanish at this size)."""
    from lowbit.optim.states import state_bytes_per_param

    recipe = get_recipe(recipe)
    p_bytes = _bytes(recipe.param_dtype)
    master = 0
    if recipe.param_dtype != "fp32" and recipe.master_dtype is not None:
        master = _bytes(recipe.master_dtype)
    elif recipe.param_dtype != "fp32" and recipe.update_rounding is UpdateRounding.KAHAN:
        master = p_bytes
    return 2 * p_bytes + master + state_bytes_per_param(state_precision_name, 1 << 24)


def bytes_per_param_table() -> str:
    """The Markdown table of `model_state_bytes_per_param` for every recipe x state precision
    (docs/memory.md holds a copy; a test keeps them equal)."""
    from lowbit.optim.states import STATE_PRECISIONS
    from lowbit.recipes import names

    lines = [
        "| recipe | " + " | ".join(f"{s} states" for s in STATE_PRECISIONS) + " |",
        "|---|" + "---:|" * len(STATE_PRECISIONS),
    ]
    for name in names():
        values = [model_state_bytes_per_param(name, s) for s in STATE_PRECISIONS]
        lines.append(f"| `{name}` | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    return "\n".join(lines)
