"""Estimating training memory from a model config, a recipe and an optimizer-state precision.

Model states (exact: the tests compare them with `measure` byte for byte)
-------------------------------------------------------------------------
Parameter shapes come from instantiating the model on the ``meta`` device (no memory), so every
tensor's size is known and the small-tensor rule of the optimizer states is applied per tensor.

- parameters: ``numel x`` the recipe's ``param_dtype`` size;
- gradients: the same dtype (autograd's ``.grad`` has the parameter's dtype);
- master weights: 4 bytes per parameter with ``master_dtype="fp32"``; a Kahan recipe's compensation
  buffer instead, one parameter-dtype value per parameter;
- optimizer states: Adam's two moments and step counter per tensor (`lowbit.optim.adam_state_bytes`).

With ``sharding="fsdp"`` these four are divided evenly over ``gpus`` (ZeRO-3 / FSDP full
sharding); the fp32-states rule is decided on the global tensor, so the division is exact up to
rounding. FSDP's gathered parameters of the current and the prefetched layer are added to the
temporaries.

Activations (a model, within 15% of the measurement on lowbit's sizes)
-----------------------------------------------------------------------
The bytes the forward saves for the backward in a Llama block (Hugging Face's
``LlamaForCausalLM`` with SDPA), for ``n = batch x seq`` tokens, hidden ``h``, MLP width ``f``,
``H`` query and ``K`` key/value heads of width ``d``; ``r`` is the residual stream's bytes (the
parameter dtype) and ``c`` the compute dtype's (autocast or parameter dtype):

- each RMSNorm saves its fp32 input (``4nh``), normalized output (``rnh``) and ``rsqrt`` (``4n``);
- q/k/v projections save their input (``c nh``, three copies under autocast, one without);
- attention saves q, k, v and the output (``c n d (2H + 2K)``) and the log-sum-exp (``4nH``);
- gate/up projections save their input (``c nh``, two copies under autocast, one without); SiLU
  its input, the product both factors, down_proj its input (``4 c n f``);
- outside the blocks: token ids (``8n``), the final norm, the head's input (``c nh``), the loss's
  log-softmax over the vocabulary ``V`` in fp32 (``4nV``) and targets (``8n``), rotary cos/sin.

Converted (fp8/int8/MX) layers save their input quantized when the forward's quantized operand can
be reused by the weight gradient (tensorwise current scaling), at the format's bits on hardware
that has it (the CPU emulation keeps them in a bf16 carrier), and their weight as a quantized
temporary copy. With activation checkpointing (one checkpoint per block) only each block's input
(``rnh``) is kept, plus one block's activations recomputed during its backward. Not modelled:
transient workspace (the logits' gradient, attention scratch), allocator fragmentation and the
CUDA context.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import UsageError, choose
from lowbit.formats import get as get_format
from lowbit.memory.breakdown import Breakdown
from lowbit.optim.states import adam_state_bytes, state_precision
from lowbit.recipes import Recipe, UpdateRounding, get_recipe
from lowbit.recipes.recipe import DTYPES

SHARDING = ("none", "fsdp")
# Nominal memory of common accelerators, GiB: RTX 4090 / A10 (24), A100-40GB (40),
# A100/H100-80GB (80), H200 (141).
ACCELERATORS_GIB = (24, 40, 80, 141)
RESERVE = 0.05  # left free for the CUDA context, allocator fragmentation and workspace


@dataclass(frozen=True)
class ModelShape:
    """What the estimator needs of a model: its parameter sizes and the Llama dimensions."""

    name: str
    param_numels: tuple[int, ...]  # every parameter tensor (tied ones once)
    linear_numels: tuple[tuple[str, int], ...]  # (qualified name, numel) of nn.Linear weights
    block_numel: int  # parameters of one decoder block
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int

    @property
    def num_params(self) -> int:
        return sum(self.param_numels)


def _load_config(config_or_size):
    from transformers import AutoConfig, PretrainedConfig

    from lowbit.models import list_sizes, model_config

    if isinstance(config_or_size, PretrainedConfig):
        return config_or_size, getattr(config_or_size, "name_or_path", "") or "config"
    text = str(config_or_size)
    if text in list_sizes():
        return model_config(text), text
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UsageError(
            f"{text!r} is neither a model size ({', '.join(list_sizes())}) nor a config.json; "
            "fix: give a size name or the path of a Hugging Face config.json"
        )
    try:
        fields = json.loads(path.read_text())
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    except (KeyError, ValueError) as error:
        raise UsageError(f"{path}: not a Hugging Face config.json ({error})") from None
    return config, str(path)


def model_shape(config_or_size) -> ModelShape:
    """The `ModelShape` of a named size, a ``config.json`` path or a ``PretrainedConfig``."""
    from transformers import AutoModelForCausalLM

    config, name = _load_config(config_or_size)
    needed = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [f for f in needed if getattr(config, f, None) is None]
    if missing:
        raise UsageError(
            f"{name}: the activation model needs a Llama-style config; missing {', '.join(missing)}"
        )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = list(model.parameters())
    linears = tuple(
        (n, m.weight.numel()) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    )
    heads = config.num_attention_heads
    return ModelShape(
        name=name,
        param_numels=tuple(p.numel() for p in params),
        linear_numels=linears,
        block_numel=sum(p.numel() for n, p in model.named_parameters() if ".layers.0." in n),
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        intermediate=config.intermediate_size,
        vocab=config.vocab_size,
        max_positions=getattr(config, "max_position_embeddings", 0) or 0,
    )


def _bytes(dtype_name: str) -> int:
    return DTYPES[dtype_name].itemsize


def _layer_input_bytes(recipe: Recipe, name: str, hp_bytes: int) -> tuple[float, float, bool]:
    """For the linear called ``name``: (bytes per saved input value, bytes per weight value of the
    saved quantized weight copy, whether the input is quantized per layer)."""
    spec, _ = recipe.layer_for(name)
    if spec is None or spec.is_identity:
        return hp_bytes, 0.0, False
    from lowbit.nn.linear import _reusable

    ops = spec.operands()
    x_bits = get_format(ops["forward.x"].format).bits
    w_bits = get_format(ops["forward.w"].format).bits
    reuse_x = _reusable(ops["forward.x"], ops["grad_weight.x"])
    reuse_w = _reusable(ops["forward.w"], ops["grad_input.w"])
    return (x_bits / 8 if reuse_x else hp_bytes), (w_bits / 8 if reuse_w else 0.0), reuse_x


def _activations(shape: ModelShape, recipe: Recipe, tokens: int, seq: int) -> tuple[float, float]:
    """(activations of the whole forward, of one block) in bytes, for ``tokens = batch x seq``."""
    n, h, f = tokens, shape.hidden, shape.intermediate
    r = _bytes(recipe.param_dtype)
    autocast = recipe.autocast is not None
    c = _bytes(recipe.autocast) if autocast else r
    norm = 4 * n * h + r * n * h + 4 * n

    def gemm_inputs(names: list[str], copies_under_autocast: bool) -> float:
        per_value = [_layer_input_bytes(recipe, nm, c if autocast else r) for nm in names]
        quantized = [b for b, _, q in per_value if q]
        plain = [b for b, _, q in per_value if not q]
        total = sum(quantized) * n * h
        if plain:  # the same high-precision input is saved once, or cast per GEMM by autocast
            total += (sum(plain) if copies_under_autocast and autocast else max(plain)) * n * h
        return total

    block = (
        2 * norm
        + gemm_inputs([f"model.layers.0.self_attn.{p}_proj" for p in "qkv"], True)
        + c * n * shape.head_dim * (2 * shape.heads + 2 * shape.kv_heads)
        + 4 * n * shape.heads
        + gemm_inputs([f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up")], True)
        + 4 * c * n * f
    )
    outside = (
        8 * n  # token ids
        + norm
        + gemm_inputs(["lm_head"], True)
        + 4 * n * shape.vocab  # log-softmax output, fp32
        + 8 * n  # targets
        + 2 * 4 * seq * shape.head_dim  # rotary cos, sin
    )
    return shape.layers * block + outside, block


def _temporaries(shape: ModelShape, recipe: Recipe) -> float:
    """Low-precision weight copies saved for the backward: autocast's casts of the weights of
    unconverted linears, converted layers' quantized weights."""
    total = 0.0
    for name, numel in shape.linear_numels:
        spec, _ = recipe.layer_for(name)
        if spec is None or spec.is_identity:
            if recipe.autocast is not None and _bytes(recipe.autocast) != _bytes(
                recipe.param_dtype
            ):
                total += _bytes(recipe.autocast) * numel
        else:
            total += _layer_input_bytes(recipe, name, 0)[1] * numel
    return total


def estimate(
    config_or_size,
    recipe: str | Recipe = "fp32",
    state_precision_name: str = "fp32",
    batch: int = 1,
    seq: int = 1024,
    gpus: int = 1,
    sharding: str = "none",
    activation_checkpointing: bool = False,
) -> Breakdown:
    """Memory per device of training ``config_or_size`` (named size, config.json, or a
    ``PretrainedConfig``) with ``recipe``, Adam states in ``state_precision_name``, micro-batch
    ``batch`` x ``seq`` tokens per device. See the module docstring for the model."""
    recipe = get_recipe(recipe)
    precision = state_precision(state_precision_name)
    choose("sharding", sharding, SHARDING)
    if batch < 1 or seq < 1 or gpus < 1:
        raise UsageError("batch, seq and gpus must be at least 1")
    if sharding == "fsdp" and gpus == 1:
        sharding = "none"
    shape = model_shape(config_or_size)
    if shape.max_positions and seq > shape.max_positions:
        raise UsageError(
            f"sequence length {seq} exceeds the model's {shape.max_positions} positions; "
            "fix: use a shorter --seq"
        )
    p_bytes = _bytes(recipe.param_dtype)
    n = shape.num_params
    out = Breakdown(num_params=n)
    out.parameters = p_bytes * n
    out.gradients = p_bytes * n
    if recipe.param_dtype != "fp32" and recipe.master_dtype is not None:
        out.master_weights = _bytes(recipe.master_dtype) * n
    elif recipe.param_dtype != "fp32" and recipe.update_rounding is UpdateRounding.KAHAN:
        out.master_weights = p_bytes * n
    out.optimizer_states = sum(adam_state_bytes(precision, k) for k in shape.param_numels)
    if sharding == "fsdp":
        for name in ("parameters", "gradients", "master_weights", "optimizer_states"):
            setattr(out, name, math.ceil(getattr(out, name) / gpus))
        out.notes.append("fsdp: gathered parameters of two blocks (current and prefetched)")
        fsdp_gather = 2 * p_bytes * shape.block_numel
    else:
        fsdp_gather = 0.0
    full, block = _activations(shape, recipe, batch * seq, seq)
    if activation_checkpointing:
        kept = full - shape.layers * block + shape.layers * p_bytes * batch * seq * shape.hidden
        out.activations = round(kept + block)
        out.notes.append("activation checkpointing: one checkpoint per block")
    else:
        out.activations = round(full)
    out.temporaries = round(_temporaries(shape, recipe) + fsdp_gather)
    return out


def fits(
    config_or_size,
    recipe: str | Recipe,
    state_precision_name: str,
    seq: int,
    capacity_bytes: float,
    **kw,
) -> int:
    """The largest micro-batch that fits ``capacity_bytes`` (0: not even batch 1)."""
    one = estimate(config_or_size, recipe, state_precision_name, 1, seq, **kw)
    two = estimate(config_or_size, recipe, state_precision_name, 2, seq, **kw)
    per_sample = two.total - one.total
    fixed = one.total - per_sample
    if one.total > capacity_bytes:
        return 0
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
