"""Session 41: small things users ran into. A --model folder of fewer positions than the default
sequence length, given no --seq-len, is estimated and trained at its own limit (both refused a
length the user never gave); `lowbit train` refuses an encoder's folder with the fix `lowbit
estimate` gives (--task token-classification); `lowbit compare --nproc`/`--strategy` say why in
one line, as the same settings in a --config file do."""

import json

import pytest
import yaml

from lowbit.cli import main

LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 300,
    "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
    "max_position_embeddings": 64,
}  # fmt: skip


@pytest.fixture
def small_folder(tmp_path):
    """A causal LM's folder (config only: a fresh model) of 64 positions."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA))
    return str(folder)


def test_estimate_without_seq_takes_the_models_own_limit(small_folder, capsys):
    """The default 1024 was refused: "sequence length 1024 exceeds the model's 64 positions"."""
    assert main(["estimate", "--model", small_folder, "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["settings"]["seq"] == 64
    assert "no --seq given: 64, the most the model's 64 positions take" in err
    # one given above the limit is still refused
    assert main(["estimate", "--model", small_folder, "--seq-len", "100"]) == 2
    assert "sequence length 100 exceeds the model's 64 positions" in capsys.readouterr().err


def test_train_without_seq_len_takes_the_models_own_limit(small_folder, tmp_path, capsys):
    """The default 256 was refused as the estimate's 1024 was; the run takes 64, as estimated."""
    run = tmp_path / "run"
    argv = ["train", "--model", small_folder, "--steps", "1", "--batch-size", "2", "--quiet"]
    assert main([*argv, "--eval-batches", "1", "--out", str(run)]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["seq_len"] == 64
    assert "no --seq-len given: 64" in capsys.readouterr().err
    assert main([*argv, "--seq-len", "100", "--out", str(tmp_path / "other")]) == 2
    assert "sequence length 100 exceeds the model's 64 positions" in capsys.readouterr().err


def test_train_and_estimate_refuse_an_encoder_with_the_same_fix(tmp_path, capsys):
    """train's refusal of a BERT masked-LM folder named only a causal-LM head as the fix; estimate's
    named --task token-classification: both now name both."""
    from transformers import BertConfig, BertForMaskedLM

    folder = tmp_path / "bert"
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    BertForMaskedLM(config).save_pretrained(folder)
    fixes = []
    for argv in (
        ["train", "--model", str(folder), "--steps", "1", "--out", str(tmp_path / "run")],
        ["estimate", "--model", str(folder), "--seq", "16"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "is not a causal language model" in err
        fixes.append(err.split("; fix: ")[1])
    assert fixes[0] == fixes[1]
    assert "--task token-classification" in fixes[0] and "BertLMHeadModel" in fixes[0]


@pytest.mark.parametrize("flag,value", [("--nproc", "2"), ("--strategy", "fsdp")])
def test_compare_refuses_multi_process_flags_in_one_line(flag, value, tmp_path, capsys):
    """argparse's bare "unrecognized arguments: --nproc 2", where a --config file's nproc said
    that a study trains each run in one process."""
    out = tmp_path / "study"
    assert main(["compare", "--recipes", "fp32", flag, value, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"lowbit: error: {flag} {value}: a compare study trains every run in one process (--jobs "
        f"trains several runs at a time); fix: drop {flag}"
    )
    assert not out.exists()


def test_compare_and_doctor_without_seq_len_take_the_models_own_limit(
    small_folder, tmp_path, capsys
):
    """Both refused "sequence length 256 exceeds the model's 64 positions" where `lowbit train`
    took 64 (`resolve` chooses it now for all three); a study says so once, not once per run."""
    study, note = tmp_path / "study", "lowbit: note: no --seq-len given: 64"
    argv = ["compare", "--model", small_folder, "--recipes", "fp32", "--seeds", "2", "--steps"]
    argv += ["1", "--batch-size", "2", "--eval-batches", "1", "--no-plots", "--out", str(study)]
    assert main(argv) == 0
    assert capsys.readouterr().err.count(note) == 1
    for seed in (0, 1):
        config = (study / "runs" / "fp32" / f"seed-{seed}" / "config.yaml").read_text()
        assert yaml.safe_load(config)["seq_len"] == 64
    assert main(argv) == 0  # the same study again: its runs reused, its settings unchanged
    out, err = capsys.readouterr()
    assert out.count("reused") == 2 and err.count(note) == 1
    doctor = ["doctor", "--model", small_folder, "--probe-steps", "1", "--batch-size", "2"]
    assert main([*doctor, "--out", str(tmp_path / "doctor")]) == 0
    assert capsys.readouterr().err.count(note) == 1


def test_a_length_past_the_positions_is_refused_naming_the_flag(small_folder, tmp_path, capsys):
    """The fix said "use a shorter sequence length", naming no flag; a resumed run keeps the
    length it recorded."""
    run = tmp_path / "run"
    argv = ["train", "--model", small_folder, "--batch-size", "2", "--eval-batches", "1", "--quiet"]
    assert main([*argv, "--steps", "1", "--seq-len", "32", "--out", str(run)]) == 0
    assert main([*argv, "--steps", "2", "--resume", str(run)]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["seq_len"] == 32
    capsys.readouterr()
    for command in (argv, ["compare", "--model", small_folder, "--recipes", "fp32"]):
        assert main([*command, "--seq-len", "100", "--out", str(tmp_path / "other")]) == 2
        assert capsys.readouterr().err.strip() == (
            "lowbit: error: sequence length 100 exceeds the model's 64 positions; fix: --seq-len "
            "64 or less, or a model with more positions"
        )
        assert not (tmp_path / "other").exists()
