"""Session 42 review of the warnings held until a command is past its refusals (50d041e).

- `lowbit doctor --checkpoint RUN` of a diverged run with 16-bit parameters (bf16-low: no fp32
  master copy) was refused by the optimizer's check of non-finite parameters, with a wrong cause
  and fix: the checkpoint's weights were loaded before the trainer built its optimizer. The probe
  reports them as [non-finite-weights], as before session 42.
- A warning of the data that explains a refusal of it (a compressed file not read, then the train
  split empty) was held and dropped with the refusal: the error came alone.
- A warning said once per process (`lowbit.errors.warn_once`) counted as said when held: dropped
  with a refusal, no later command of the process said it.
- An ``auto`` run's plan record was written only as the plan moved, while the GEMMs that run move
  with a mixture of experts' routing: `lowbit estimate RUN` counted the plan's operands as the
  run's first check found them, not as its summary did at its end.
"""

import gzip
import re

import pytest
import torch

from lowbit.cli import main
from lowbit.errors import UsageError, warnings_held
from tests.moe import mixtral_config

COMPRESSED = "compressed file not read"


def test_doctor_of_a_diverged_bf16_low_run_names_its_inf_weights(tmp_path, capsys):
    run = str(tmp_path / "run")
    settings = ["--model", "nano", "--recipe", "bf16-low", "--batch-size", "2", "--seq-len", "16"]
    assert main(["train", *settings, "--steps", "1", "--out", run, "--quiet"]) == 0
    (path,) = (tmp_path / "run" / "checkpoints").glob("*.pt")
    state = torch.load(path, map_location="cpu", weights_only=False)
    name = next(key for key in state["model"] if "mlp" in key)
    assert state["model"][name].dtype == torch.bfloat16  # no fp32 copy of it elsewhere
    state["model"][name].view(-1)[0] = float("inf")  # as a run that diverged saved it
    torch.save(state, path)
    capsys.readouterr()
    out = ["--out", str(tmp_path / "doctor")]
    assert main(["doctor", "--checkpoint", run, "--probe-steps", "1", *out]) == 0
    printed = capsys.readouterr()
    assert "[non-finite-weights]" in printed.out and name in printed.out
    assert "error" not in printed.err


def test_doctor_refuses_finite_weights_its_fp16_parameters_cannot_hold(tmp_path, capsys):
    """Review R8: an fp32 run's 1e6, probed under fp16-low, became inf as it loaded, and the
    probe reported the weights non-finite before its first step (go back to an earlier one)."""
    run = str(tmp_path / "run")
    settings = ["--task", "image-classification", "--model", "tiny", "--batch-size", "8"]
    assert main(["train", *settings, "--steps", "1", "--out", run, "--quiet"]) == 0
    (path,) = (tmp_path / "run" / "checkpoints").glob("*.pt")
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["model"]["features.0.weight"].view(-1)[0] = 1e6  # finite, past fp16's 65504
    torch.save(state, path)
    capsys.readouterr()
    probe = ["doctor", "--checkpoint", run, "--recipe", "fp16-low", "--probe-steps", "1"]
    assert main([*probe, "--out", str(tmp_path / "doctor")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "features.0.weight holds 1e+06, past fp16's largest 65504" in line, line
    assert "fix: probe it under the run's own recipe" in line


def _data(folder, text: str):
    """A folder of ``a.txt`` holding ``text`` and a compressed file beside it (warned of)."""
    folder.mkdir()
    (folder / "a.txt").write_text(text)
    with gzip.open(folder / "big.txt.gz", "wt") as f:
        f.write("lots of text. " * 500)
    return str(folder)


def test_a_data_warning_comes_before_the_refusal_it_explains(tmp_path, capsys):
    data = _data(tmp_path / "data", "hello world. " * 3)  # too short for a train split
    argv = ["train", "--data", data, "--batch-size", "2", "--seq-len", "16", "--steps", "1"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("lowbit: warning: ") and COMPRESSED in lines[0]
    assert lines[1].startswith("lowbit: error: ") and "empty" in lines[1]


def test_a_warning_dropped_with_a_refusal_is_said_by_the_next_read(tmp_path, capsys):
    from lowbit.data import load_corpus

    data = _data(tmp_path / "data", "".join(f"document {i} of the corpus.\n\n" for i in range(200)))
    with pytest.raises(UsageError), warnings_held():
        load_corpus(data)  # its warning held, then dropped with the command's refusal
        raise UsageError("refused")
    assert COMPRESSED not in capsys.readouterr().err
    load_corpus(data)  # the next command of the process
    assert COMPRESSED in capsys.readouterr().err
    load_corpus(data)  # said once
    assert COMPRESSED not in capsys.readouterr().err


def test_an_auto_moe_runs_estimate_counts_as_its_summary_at_its_end(tmp_path, capsys):
    folder = tmp_path / "moe"
    # one layer of 16 experts, top-1, a sequence of 8 tokens a step: the experts that run at the
    # check of step 25 are others than at the first plan's (step 1)
    mixtral_config(
        num_hidden_layers=1, num_local_experts=16, num_experts_per_tok=1, hidden_size=32,
        intermediate_size=32, max_position_embeddings=64,
    ).save_pretrained(folder)  # fmt: skip
    run = str(tmp_path / "run")
    settings = ["--model", str(folder), "--recipe", "auto", "--batch-size", "1", "--seq-len", "8"]
    assert main(["train", *settings, "--steps", "26", "--out", run]) == 0
    (trained,) = re.findall(r"auto plan +(.+ of \d+ operands)", capsys.readouterr().out)
    assert main(["estimate", "--model", run, "--recipe", "auto"]) == 0
    out = capsys.readouterr()
    (estimated,) = re.findall(
        r"estimated at the auto plan of step \d+: (.+ of \d+ operands)", out.out + out.err
    )
    assert estimated == trained
