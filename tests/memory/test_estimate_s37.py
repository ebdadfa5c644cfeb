"""Session 37: `lowbit estimate` follow-ups.

- Several recipes (the side-by-side table) printed none of the notes that a one-recipe estimate
  prints (FSDP's gathered parameters, activation checkpointing's blocks): each distinct note is
  printed once under the table, with the recipes it applies to.
- A recipe that keeps every GEMM layer of the model in high precision (nvfp4 on a 2-block
  model), and an override that applies to no layer, were estimated without a word, where
  `lowbit train` warns of both: the estimate says so in a note, and that it estimates `auto` at
  the plan it starts from (docs/memory.md alone said so).
- ``--model ~/runs/R`` quoted (no shell expanded it) was "nothing at that path", where lowbit
  train reads it as the home folder's.
- A run folder whose --model folder was moved since said "nothing at that path, nor a model
  size" of a path the user never typed; it names the run.
- A --seq past the model's positions was refused without saying how short.
- ``lowbit.memory.estimate("")`` (an empty model name) read the current folder as the model:
  a run folder there was estimated.
"""

import pytest

from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.memory import estimate
from lowbit.models import model_config
from lowbit.recipes import get_recipe
from lowbit.train.config import TrainConfig, resolve, write

FSDP = "fsdp: parameters gathered in {}: two blocks (current and prefetched) and the root's"


def test_the_recipe_table_prints_each_note_once_with_its_recipes(capsys):
    argv = ["estimate", "--model", "nano", "--seq", "16", "--gpus", "2", "--sharding", "fsdp"]
    recipes = ["--recipe", "fp32,bf16-mixed", "--activation-checkpointing"]
    assert main([*argv, *recipes]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note")]
    assert notes == [
        f"note (fp32): {FSDP.format('fp32')} (embeddings, head)",
        "note (every recipe): activation checkpointing: one checkpoint per block",
        f"note (bf16-mixed): {FSDP.format('bf16')} (embeddings, head)",
    ]


def test_an_empty_model_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch):
    here = tmp_path / "run"
    here.mkdir()
    write(resolve(TrainConfig(out=str(here), model="nano")), here)  # a run folder: estimated
    monkeypatch.chdir(here)
    for empty in ("", " "):
        with pytest.raises(UsageError) as error:
            estimate(empty)
        assert str(error.value) == (
            "the model to estimate is an empty string; fix: give a size, a config.json or its "
            "folder, or a run folder"
        )


KEEPS_EVERY = (
    "the recipe keeps every GEMM layer of this model in high precision (lowbit train warns of it "
    "too), so it trains, and is estimated, as its compute dtype does"
)


def test_a_recipe_that_converts_no_layer_an_unused_override_and_auto_are_noted():
    two_blocks = model_config("nano")
    two_blocks.num_hidden_layers = 2  # nvfp4 keeps its first and last block in bf16: all of them
    assert estimate(two_blocks, "nvfp4", seq=16).notes == [KEEPS_EVERY]
    assert estimate(two_blocks, "mxfp4", seq=16).notes == []
    typo = get_recipe("mxfp4").with_overrides("lm_haed=keep")
    said = "override lm_haed=keep applies to no layer (lowbit doctor lists the names)"
    assert estimate(two_blocks, typo, seq=16).notes == [said]
    assert estimate(two_blocks, "auto:fp4", seq=16).notes == [
        "auto is estimated at the plan it starts from, every converted layer in bf16: the most it "
        "holds (its fp8 and MX rungs save a quantized or bf16 input and at most a 1-byte weight "
        "copy)"
    ]


def test_a_quoted_tilde_in_model_is_the_home_folder(tmp_path, monkeypatch, capsys):
    """As lowbit train reads its --model: the estimate said "nothing at that path"."""
    run = tmp_path / "runs" / "R"
    run.mkdir(parents=True)
    write(resolve(TrainConfig(out=str(run), model="nano")), run)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["estimate", "--model", "~/runs/R", "--seq", "16", "--batch", "1"]) == 0
    assert capsys.readouterr().out.startswith(f"model {run}: 183,872 parameters; ")


def test_a_sequence_past_the_models_positions_names_the_longest():
    """The fix said "use a shorter --seq" without saying how short."""
    with pytest.raises(UsageError) as error:
        estimate("nano", seq=1025)
    assert str(error.value) == (
        "sequence length 1025 exceeds the model's 1024 positions; fix: --seq 1024 or less"
    )


def test_a_run_whose_model_folder_is_gone_names_the_run(tmp_path, capsys):
    """It said "nothing at that path, nor a model size; fix: a size name, ..." of a path the
    user never typed."""
    model, run = tmp_path / "my-model", tmp_path / "R"
    model.mkdir()
    model_config("nano").save_pretrained(model)
    run.mkdir()
    write(resolve(TrainConfig(out=str(run), model=str(model))), run)
    (model / "config.json").unlink()
    model.rmdir()  # moved since the run
    assert main(["estimate", "--model", str(run)]) == 2
    assert capsys.readouterr().err == (
        f"lowbit: error: {run}: the model the run trained from, {model}, is gone (nothing is at "
        "that path; a run trained from a folder needs it where it was); fix: put it back there, "
        "or --model its new place with the run's settings as flags\n"
    )


def test_the_keeps_every_layer_note_is_converts_own(tmp_path):
    """The note worked out from the recipe's decisions alone (`Recipe.layer_for`), where
    `convert` (and so `lowbit train`'s warning) also keeps a layer whose weight its parent reads
    itself: a Mamba mixer's dt_proj. With the mixers' other projections kept, convert converts
    no layer, and lowbit train warns so; the estimate said nothing."""
    from transformers import MambaConfig

    config = MambaConfig(
        hidden_size=32, num_hidden_layers=2, vocab_size=300, state_size=4, conv_kernel=4
    )
    config.save_pretrained(tmp_path / "mamba")
    others_kept = get_recipe("mxfp8").with_overrides("*.in_proj|*.x_proj|*.out_proj=keep")
    assert estimate(tmp_path / "mamba", others_kept, seq=16).notes == [KEEPS_EVERY]
    assert estimate(tmp_path / "mamba", "mxfp8", seq=16).notes == []
