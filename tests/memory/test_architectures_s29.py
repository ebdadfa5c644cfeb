"""Session 29's hunt through `lowbit estimate` with other architectures and huge sizes."""

import re

import torch
import torch.nn.functional as F

import lowbit
from lowbit.cli import main
from lowbit.memory import estimate, human, measure
from lowbit.models.causal_lm import load_causal_lm
from lowbit.optim import build_optimizer

MODEL_STATES = ("parameters", "gradients", "master_weights", "optimizer_states")


def test_multimodal_gemma3_states_are_those_of_the_text_it_trains_on(tmp_path):
    """Gemma 3's multimodal model trains on text only, so its vision tower and projector get no
    gradients, master weights or optimizer states; the estimate counted them all (its gradients
    were 466,816 bytes for a live run's 314,112)."""
    from transformers import Gemma3Config

    text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=16)
    text.update(num_key_value_heads=2, intermediate_size=96, vocab_size=257)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    vision.update(num_attention_heads=2, image_size=28, patch_size=14)
    Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4).save_pretrained(
        tmp_path
    )
    model = load_causal_lm(tmp_path, seed=0).train()
    precision = lowbit.Precision("bf16-low")  # fp32 master weights of bf16 parameters
    model = precision.convert(model)
    optimizer = precision.wrap_optimizer(
        build_optimizer(model.parameters(), lr=1e-3, state_precision="8bit")
    )
    windows = torch.randint(0, 257, (2, 17), generator=torch.Generator().manual_seed(0))
    for step in range(2):  # the first step creates the states and master weights
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            logits = model(input_ids=windows[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten())
        precision.backward(loss)
        if step == 0:
            precision.step(optimizer)
    measured = measure(model, optimizer, precision)
    assert not measured.notes
    estimated = estimate(tmp_path, "bf16-low", "8bit", 2, 16)
    assert estimated.num_params == measured.num_params
    for name in MODEL_STATES:
        assert getattr(estimated, name) == getattr(measured, name), name


def test_terabyte_rows_stay_in_their_columns(capsys):
    """Byte counts of 100 TB and more (a large batch of a large model) ran into the next column:
    ``15,798,116,356,994,30814368.30 TiB229035.72``; beyond 1024 TiB the unit is PiB."""
    args = ["estimate", "--model", "tiny", "--seq", "64", "--batch", "10000000"]
    assert main([*args, "--recipe", "fp32"]) == 0
    rows = capsys.readouterr().out.split("-\n", 1)[1].split("\n(total")[0]  # the note below
    for row in rows.splitlines():
        # label, bytes, size and unit, bytes per parameter: separated by spaces
        assert re.fullmatch(r"[A-Za-z /]+? {2,}[\d,]+ +[\d.]+ [KMGTP]?i?B +[\d.]+", row), row
    assert "PiB" not in rows and "TiB" in rows  # terabytes of activations: the case above
    assert human(14 * 2**50) == "14.00 PiB"


def test_a_breakdown_of_nothing_prints_its_table():
    """Every figure 0 (a model of no parameters): the widths' max() had no figure to take."""
    from lowbit.memory.breakdown import Breakdown

    lines = Breakdown(num_params=0).table().splitlines()
    assert lines[0].split() == ["component", "estimate", "B/param"]
    assert next(x for x in lines if x.startswith("total")).split()[:2] == ["total", "0"]
    assert lines[-1].endswith(")")  # the note under it (`Breakdown._total_note`)
