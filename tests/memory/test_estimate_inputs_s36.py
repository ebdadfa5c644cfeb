"""Session 36: what a new user gives `lowbit estimate` and `lowbit.memory.estimate` first.

- ``--task token-classification --model FOLDER`` without ``--seq`` was refused for every
  BERT-family encoder ("sequence length 1024 exceeds the model's 512 positions"): the default
  was the causal LMs' 1024. It is now `lowbit train`'s default for the task (64), as a tagger's run
  folder without a recorded --seq-len already was.
- ``--model`` of a run's checkpoint (``runs/R/checkpoints/step-0000004.pt``), its ``checkpoints/``
  folder or its ``config.yaml`` said "not valid JSON ('utf-8' codec can't decode byte 0x80 ...)"
  or "holds no config.json", and of a folder of runs "holds no config.json": each now names the
  run folder that --model takes.
- ``--model meta-llama/Llama-2-7b-hf`` (a Hub name) said "nothing at that path, nor a model
  size": it now says that lowbit reads local files only, with the `hf download` command that
  fetches the config.json an estimate needs.
- `lowbit.memory.estimate` of a model itself (``estimate(model, ...)``) failed with "[Errno 36]
  File name too long: 'LlamaForCausalLM(...'", and of a float batch with "zeros() takes 1
  positional argument but 2 were given": each is now refused in one line with its fix.
"""

import pytest
from transformers import BertConfig

from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.memory import estimate
from lowbit.models import build_model
from lowbit.train.config import TASK_DEFAULTS, TrainConfig, resolve, write


def _bert(folder):
    BertConfig(
        vocab_size=12, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64,
    ).save_pretrained(folder)  # fmt: skip
    return folder


def test_an_encoder_is_estimated_at_the_taggers_default_length(tmp_path, capsys):
    folder = _bert(tmp_path / "bert")  # 512 positions, as BERT's
    assert main(["estimate", "--model", str(folder), "--task", "token-classification"]) == 0
    seq = TASK_DEFAULTS["token-classification"]["seq_len"]
    assert f"; batch 1 x seq {seq};" in capsys.readouterr().out.splitlines()[0]


def _run(folder):
    """A run folder as `lowbit train` writes it (its config.yaml)."""
    folder.mkdir(parents=True)
    write(resolve(TrainConfig(model="nano", out=str(folder))), folder)
    return folder


def _error(capsys, *argv) -> str:
    assert main(["estimate", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    "inside", ["checkpoints/step-0000004.pt", "checkpoints", "config.yaml", "checkpoints/x.dcp"]
)
def test_a_path_inside_a_run_folder_names_the_run_folder(tmp_path, capsys, inside):
    run = _run(tmp_path / "runs" / "nano-run")
    (run / "checkpoints" / "x.dcp").mkdir(parents=True)
    (run / "checkpoints" / "step-0000004.pt").write_bytes(b"\x80\x02 a pickled checkpoint")
    line = _error(capsys, "--model", str(run / inside))
    assert line == (
        f"lowbit: error: {run / inside}: inside the lowbit run folder {run}, not a model; "
        f"fix: --model {run} (that run's model and settings)"
    )
    # the run folder itself is estimated
    assert main(["estimate", "--model", str(run), "--seq", "16"]) == 0


def test_a_folder_of_runs_names_one_of_them(tmp_path, capsys):
    runs = tmp_path / "runs"
    for name in ("b-run", "a-run"):
        _run(runs / name)
    line = _error(capsys, "--model", str(runs))
    assert line == (
        f"lowbit: error: {runs}: a folder of lowbit runs, not one run; fix: one of them, "
        f"such as {runs / 'a-run'}"
    )


def test_a_model_given_for_its_config_is_refused_with_the_fix():
    model = build_model("causal-lm", "nano", vocab_size=257)
    with pytest.raises(UsageError, match=r"is a LlamaForCausalLM, not a named size.*"
                       r"fix: its config, estimate\(model.config, ...\)$"):  # fmt: skip
        estimate(model, "bf16-mixed", seq=16)
    assert estimate(model.config, "bf16-mixed", seq=16).num_params == model.num_parameters()


@pytest.mark.parametrize("batch", [2.5, "4", True])
def test_a_batch_that_is_no_whole_number_is_refused(batch):
    with pytest.raises(UsageError, match=rf"^batch must be a whole number of at least 1, got {batch!r}; fix"):  # fmt: skip
        estimate("nano", "bf16-mixed", batch=batch, seq=16)


def test_a_hub_name_is_answered_with_the_download_of_its_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _error(capsys, "--model", "meta-llama/Llama-2-7b-hf")
    assert line.endswith(
        "lowbit reads no Hugging Face Hub names, only local files; fix: hf download "
        "meta-llama/Llama-2-7b-hf config.json --local-dir DIR (the config is all an estimate "
        "needs), then --model DIR"
    )
    (tmp_path / "runs").mkdir()  # a mistyped path into a folder that is here: no Hub name
    assert "nothing at that path, nor a model size" in _error(capsys, "--model", "runs/typo")
