"""Session 31: the estimate against the bytes a real step holds, for recipes with layers that an
``--override`` computes in fp32, and `lowbit estimate`'s ``--override`` and ``--json``."""

import json
import re

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.cli import main
from lowbit.memory import measure, measure_activations
from lowbit.memory.breakdown import COMPONENTS, LABELS
from lowbit.memory.estimate import estimate
from lowbit.models import build_causal_lm
from lowbit.optim import build_optimizer
from lowbit.recipes import get_recipe

BATCH, SEQ = 2, 32


def _measured(model, recipe, state):
    """What one real training step of ``model`` holds (`measure`, after a first step created the
    states) and saves for the backward (`measure_activations`)."""
    precision = lowbit.Precision(recipe)
    model = precision.convert(model)
    optimizer = precision.wrap_optimizer(
        build_optimizer(model.parameters(), lr=1e-3, state_precision=state)
    )
    windows = torch.randint(0, 257, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    x, y = windows[:, :-1], windows[:, 1:]

    def forward():
        with precision.autocast():
            return F.cross_entropy(model(x).logits.flatten(0, 1).float(), y.flatten())

    precision.backward(forward())
    precision.step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    saved = measure_activations(model, forward)
    precision.backward(forward())
    live = measure(model, optimizer, precision)
    live.activations, live.temporaries = saved.activations, saved.temporaries
    return live


@pytest.mark.parametrize(
    "recipe, state, overrides",
    [
        ("bf16-mixed", "fp32", ("lm_head=fp32",)),  # fp32 head under bf16 autocast
        ("bf16-low", "8bit", ("model.layers.0.*=fp32",)),  # fp32 copies of bf16 weights
        ("int8", "fp32", ("lm_head=fp32", "model.layers.0.*=keep")),
    ],
)
def test_layers_an_override_computes_in_fp32_are_estimated_as_the_run_holds_them(
    recipe, state, overrides
):
    """An fp32 override's layer casts its input (and 16-bit weight) to fp32 and keeps the casts
    (`lowbit.nn.linear.full_precision`); the trace ran it in the recipe's dtype instead."""
    planned = get_recipe(recipe).with_overrides(*overrides)
    live = _measured(build_causal_lm("nano", 257, seed=0), planned, state)
    estimated = estimate("nano", planned, state, BATCH, SEQ)
    assert {n: getattr(estimated, n) for n in COMPONENTS} == {
        n: getattr(live, n) for n in COMPONENTS
    }


def test_gpt2_conv1d_layer_in_fp32_is_estimated_as_measured(tmp_path):
    """transformers' Conv1D keeps its weight transposed: its fp32 form reads ``weight.t()``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=257)
    config.save_pretrained(tmp_path)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    planned = get_recipe("bf16-mixed").with_overrides("transformer.h.0.attn.c_attn=fp32")
    live = _measured(model, planned, "fp32")
    estimated = estimate(tmp_path, planned, "fp32", BATCH, SEQ)
    assert (estimated.activations, estimated.temporaries) == (live.activations, live.temporaries)


def _cli_json(capsys, *args):
    assert main(["estimate", "--model", "nano", "--seq", str(SEQ), "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_override_is_the_run_train_makes(capsys):
    """`lowbit estimate --override` applies the overrides as `lowbit train --override` does, and
    the figures are the measured bytes of that run."""
    out = _cli_json(capsys, "--batch", str(BATCH), "--override", "lm_head=fp32")
    live = _measured(
        build_causal_lm("nano", 257, seed=0),
        get_recipe("bf16-mixed").with_overrides("lm_head=fp32"),
        "fp32",
    )
    assert {n: out[n] for n in COMPONENTS} == {n: getattr(live, n) for n in COMPONENTS}
    assert out["settings"]["overrides"] == ["lm_head=fp32"]


def test_cli_json_is_the_table(capsys):
    """Every figure of the printed table, and the fits, in the JSON object."""
    args = ["estimate", "--model", "nano", "--seq", str(SEQ), "--recipe", "bf16-pure-kahan"]
    assert main([*args, "--optimizer-state", "8bit"]) == 0
    table = capsys.readouterr().out
    out = _cli_json(capsys, "--recipe", "bf16-pure-kahan", "--optimizer-state", "8bit")
    rows = dict(re.findall(r"^(\S[\w /]+?)\s{2,}([\d,]+)\s", table, re.MULTILINE))
    labels = {**LABELS, "total": "total"}  # the table's row labels
    del labels["backward_workspace"]  # measured only: no row, nor a key, in an estimate
    for key, label in labels.items():
        assert out[key] == int(rows[label].replace(",", "")), key
    fits = re.findall(r"^\s+(\d+) GB\s+(yes|no)\s+largest batch (\d+)$", table, re.MULTILINE)
    assert {f"{gib} GB": {"fits": v == "yes", "largest_batch": int(n)} for gib, v, n in fits} == (
        out["fits"]
    )
    both = _cli_json(capsys, "--recipe", "fp32,bf16-pure-kahan", "--optimizer-state", "8bit")
    assert both["recipes"]["bf16-pure-kahan"]["total"] == out["total"]


def test_image_classification_is_refused_with_what_to_do_instead(capsys):
    assert main(["estimate", "--model", "tiny", "--task", "image-classification"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "image-classification CNN" in err and "fix: measure a short run" in err


FSDP_CASES = (("bf16-low", "8bit"), ("bf16-pure-kahan", "4bit"))


def _fsdp_case(recipe, state):
    """`measure`'s bytes of this rank's shards after a step of `lowbit.distributed.fsdp`'s
    sharding (as `lowbit train --strategy fsdp` shards) and a second backward."""
    from lowbit.distributed.fsdp import wrap_fsdp

    precision = lowbit.Precision(recipe)
    model = build_causal_lm("tiny", 257, seed=0)
    model = wrap_fsdp(precision.convert(model), precision, torch.device("cpu"))
    optimizer = precision.wrap_optimizer(
        build_optimizer(model.parameters(), lr=1e-3, state_precision=state)
    )
    windows = torch.randint(0, 257, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    x, y = windows[:, :-1], windows[:, 1:]

    def loss():
        with precision.autocast():
            return F.cross_entropy(model(x).logits.flatten(0, 1).float(), y.flatten())

    precision.backward(loss())
    precision.step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    precision.backward(loss())
    live = measure(model, optimizer, precision)
    return {name: getattr(live, name) for name in COMPONENTS[:4]}


def _fsdp_model_states(rank, world):
    """One rank's model states for each of `FSDP_CASES`; one spawn for all (starting the ranks is
    the slow part)."""
    return {case: _fsdp_case(*case) for case in FSDP_CASES}


@pytest.mark.slow  # two spawned gloo ranks: about a minute on a busy 2-core machine
def test_fsdp_estimate_is_the_first_ranks_shards():
    """Per device under FSDP2 is what its first rank holds: ``ceil(rows / ranks)`` rows of each
    parameter (every rank's parameters and gradients are padded to them; tiny's 257-row
    vocabulary does not divide by 2), and a step counter and code maps per tensor on every rank.
    The estimate divided the model's bytes evenly: 2.6% short of the 8-bit states rank 0 holds."""
    from tests.distributed.helpers import on_ranks

    first, second = on_ranks(_fsdp_model_states, 2)
    for recipe, state in FSDP_CASES:
        estimated = estimate("tiny", recipe, state, BATCH, SEQ, gpus=2, sharding="fsdp")
        assert {n: getattr(estimated, n) for n in COMPONENTS[:4]} == first[recipe, state]
        for name in COMPONENTS[:4]:  # the first rank holds the most
            assert second[recipe, state][name] <= first[recipe, state][name]
