"""Session 42 walk of the numerics diagnostics and the ``auto`` recipe.

- `lowbit estimate RUN` of an ``auto`` run notes the plan it is estimated at with the counts of
  the run's own summary: the operands whose GEMMs ran. It counted every planned one: a
  mixture of experts whose step routed its tokens to a few experts read "60 fp8, 156 bf16 of 216
  operands" where the run said "60 fp8 of 60 operands"; and it said that the plan's experts'
  GEMMs matched no layer of the model, and stayed in bf16, while the plan applied to them.
- A command refused once its task or model is built prints its one-line error alone: the
  doctor's own notes came first. The warnings of the data read as the task is built (a CoNLL
  line of more columns, a --model folder's weights without tokenizer files) still come as they
  are read, before a refusal they may explain (`tests/diagnostics/test_held_warnings_s42.py`).
"""

import re

import pytest

from lowbit.cli import main
from tests.moe import mixtral_config

LLAMA = {
    "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
    "intermediate_size": 64, "max_position_embeddings": 64, "vocab_size": 300,
}  # fmt: skip


def _alone(err: str, error: str, warned: str | None = None) -> None:
    """``err`` is the one-line ``error``, after the one warning of the data ``warned``, if any."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 + (warned is not None), lines
    assert lines[-1].startswith("lowbit: error: ") and error in lines[-1]
    if warned is not None:
        assert lines[0].startswith("lowbit: warning: ") and warned in lines[0]


def _conll(path, wide: bool):
    """Sentences of two tags; ``wide``: one word line of three columns (warned of)."""
    words = [("the", "O"), ("John", "B-PER"), ("saw", "O"), ("Paris", "B-LOC")] * 2
    lines = [line for _ in range(40) for line in [*(f"{w} {t}" for w, t in words), ""]]
    if wide:
        lines[0] = "New York B-LOC"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_an_auto_runs_estimate_counts_the_operands_its_summary_counts(tmp_path, capsys):
    folder = tmp_path / "moe"
    # one layer of 16 experts, top-1, one sequence of 8 tokens: most experts get no token
    mixtral_config(
        num_hidden_layers=1, num_local_experts=16, num_experts_per_tok=1, hidden_size=32,
        intermediate_size=32, max_position_embeddings=64,
    ).save_pretrained(folder)  # fmt: skip
    run = tmp_path / "run"
    settings = ["--model", str(folder), "--recipe", "auto", "--batch-size", "1", "--seq-len", "8"]
    assert main(["train", *settings, "--steps", "1", "--out", str(run)]) == 0
    (trained,) = re.findall(r"auto plan +(.+ of \d+ operands)", capsys.readouterr().out)
    assert main(["estimate", "--model", str(run), "--recipe", "auto"]) == 0
    out = capsys.readouterr()
    (estimated,) = re.findall(
        r"estimated at the auto plan of step 1: (.+ of \d+ operands)", out.out + out.err
    )
    assert estimated == trained
    assert "match no layer" not in out.out + out.err  # the experts' GEMMs are on the plan's rungs
    assert int(trained.split(" of ")[1].split()[0]) < 16 * 2 * 6 + 4 * 6  # some experts idle


def test_a_resume_refused_for_its_changed_data_says_its_warning_then_why(tmp_path, capsys):
    data, run = _conll(tmp_path / "tags.conll", wide=False), str(tmp_path / "run")
    argv = ["train", "--task", "token-classification", "--data", str(data), "--out", run]
    assert main([*argv, "--steps", "1", "--batch-size", "4", "--quiet"]) == 0
    _conll(data, wide=True)  # changed since: its new line is warned of as the task is built
    capsys.readouterr()
    assert main(["train", "--resume", "--out", run, "--steps", "2"]) == 2
    # the data's warning as it is read (which says what changed), then the refusal alone
    _alone(capsys.readouterr().err, "holds other contents than the run trained on", "columns")


@pytest.fixture
def untokenized_llama(tmp_path):
    """A Llama folder of 64 positions with weights and no tokenizer files: a new run notes the
    sequence length it takes and warns of the weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(tmp_path / "llama")
    return str(tmp_path / "llama")


def test_doctor_refusals_print_their_error_alone(tmp_path, capsys, untokenized_llama):
    capsys.readouterr()
    out = ["--out", str(tmp_path / "doctor")]
    # its note of --steps came before the refusal of --top
    assert main(["doctor", "--model", "nano", "--steps", "50", "--top", "0", *out]) == 2
    _alone(capsys.readouterr().err, "--top must be positive")
    # the folder's note came before the refusal of an override for no layer; its warning of the
    # weights comes as the task reads them
    argv = ["doctor", "--model", untokenized_llama, "--recipe", "fp8-tensorwise", *out]
    assert main([*argv, "--override", "model.layers.5.mlp=keep"]) == 2
    weights = "holds weights but no tokenizer files"
    _alone(capsys.readouterr().err, "applies to no layer of this model", weights)
    assert not (tmp_path / "doctor").exists()
    # a checkpoint of another model: the note of its positions, and emulation's warning, came first
    run = str(tmp_path / "run")
    settings = ["--model", untokenized_llama, "--batch-size", "2", "--steps", "1"]
    assert main(["train", *settings, "--out", run, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["doctor", "--checkpoint", run, "--model", "nano", *out]) == 2
    _alone(capsys.readouterr().err, "its weights do not fit the model of these settings")
    # a doctor past its refusals says its notes; the weights' warning, printed by the refused
    # doctor above, is said once in the process
    assert main(["doctor", "--model", untokenized_llama, "--probe-steps", "1", *out]) == 0
    err = capsys.readouterr().err
    assert "lowbit: note: no --seq-len given: 64" in err and weights not in err
