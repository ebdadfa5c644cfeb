"""Session 23's hunt through the inference commands: what their folders look like to other users
and to transformers, and arguments a shell script gets wrong."""

import os
import shutil
import stat

import pytest
import torch

from lowbit.cli import main
from lowbit.data.tokenizers import EOT_TEXT, ByteTokenizer
from tests.infer.conftest import _train


def one_line_error(capsys, message):
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: ") and err.count("\n") == 1, err
    assert message in err, err


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(folder):
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("exists", [False, True])
def test_written_folders_are_as_readable_as_the_run(lm_run, tmp_path, umask_022, exists):
    """A quantized folder and an export take the modes of a plain mkdir/open (0755/0644 under
    umask 022), as the run folder does: neither the staging folder's 0700 nor safetensors' 0600
    file may hide them from the group and others."""
    quant, export = tmp_path / "q", tmp_path / "hf"
    if exists:  # an existing (empty) --out takes the files one by one
        quant.mkdir()
        export.mkdir()
    assert main(["quantize", str(lm_run), "--to", "int4", "--out", str(quant)]) == 0
    assert main(["export", str(quant), "--out", str(export)]) == 0
    for folder in (quant, export):
        found = modes(folder)
        assert "model.safetensors" in found
        for name, mode in found.items():
            expected = 0o755 if (folder / name).is_dir() or name == folder.name else 0o644
            assert mode == expected, (folder, name, oct(mode))


def test_export_names_the_runs_end_of_text_as_eos_and_bos(lm_run, tmp_path, capsys):
    """A named size's LlamaConfig says eos 2 and bos 1, bytes for the byte tokenizer: the export
    names id 256 (end-of-text) instead, so transformers' greedy generate from no prompt starts
    where `lowbit generate --prompt ""` does and gives the same tokens."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    quant = tmp_path / "q"
    assert main(["quantize", str(lm_run), "--to", "int8", "--out", str(quant)]) == 0
    assert main(["export", str(quant), "--out", str(tmp_path / "hf")]) == 0
    generation = GenerationConfig.from_pretrained(tmp_path / "hf")
    assert generation.eos_token_id == generation.bos_token_id == ByteTokenizer.eot_id
    assert ByteTokenizer().decode([generation.eos_token_id]) == EOT_TEXT
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert model.config.eos_token_id == model.config.bos_token_id == ByteTokenizer.eot_id

    capsys.readouterr()
    args = ["generate", str(quant), "--prompt", "", "--temperature", "0", "--max-new-tokens", "6"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    with torch.no_grad():
        ids = model.generate(do_sample=False, max_new_tokens=6)[0].tolist()
    assert ids[0] == ByteTokenizer.eot_id  # started from bos, lowbit's empty prompt
    new = [*ids[1:], ByteTokenizer.eot_id]
    assert printed == ByteTokenizer().decode(new[: new.index(ByteTokenizer.eot_id)]) + "\n"


def test_generate_refuses_a_prompt_that_is_not_utf8(lm_run, capsys):
    """A Latin-1 byte in the arguments reaches Python as a lone surrogate, which no tokenizer
    encodes: one line naming the byte, not a traceback."""
    assert main(["generate", str(lm_run), "--prompt", "caf\udce9", "--max-new-tokens", "2"]) == 2
    one_line_error(capsys, "not UTF-8 text (byte 0xe9 at character 3)")


@pytest.mark.parametrize(
    "args",
    [
        ["export", "{run}", "--out", ""],
        ["quantize", "{run}", "--to", "int8", "--out", ""],
        ["prune", "{run}", "--sparsity", "0.5", "--out", " "],
        ["quantize", "", "--to", "int8"],
        ["eval", ""],
        ["generate", "{run}", "--checkpoint", ""],
    ],
)
def test_an_empty_path_is_refused_not_read_as_the_current_folder(
    lm_run, tmp_path, monkeypatch, capsys, args
):
    """An unset shell variable (``--out "$OUT"``) is refused, as `lowbit train` refuses one,
    rather than written into the current folder or sent to the default."""
    monkeypatch.chdir(tmp_path)
    assert main([a.format(run=lm_run) for a in args]) == 2
    one_line_error(capsys, "is an empty string")
    assert list(tmp_path.iterdir()) == []
    assert not any(p.name.startswith(f"{lm_run.name}-") for p in lm_run.parent.iterdir())


def test_eval_has_no_reference_once_the_source_holds_other_weights(lm_run, tmp_path, capsys):
    """A quantized folder's reference is the model it was made from: once its source is pruned
    again in its place (or a run trained again with --overwrite), eval reports the folder's own
    metrics and says why, instead of a change against another model."""
    pruned, quant = tmp_path / "pruned", tmp_path / "q"
    settings = ["--max-batches", "1", "--out", str(pruned)]
    assert main(["prune", str(lm_run), "--sparsity", "0.3", *settings]) == 0
    assert main(["quantize", str(pruned), "--to", "int4", "--out", str(quant)]) == 0
    capsys.readouterr()
    assert main(["eval", str(quant), "--max-batches", "1", "--json"]) == 0
    assert "baseline" in capsys.readouterr().out
    assert main(["prune", str(lm_run), "--sparsity", "0.6", *settings, "--force"]) == 0
    capsys.readouterr()
    assert main(["eval", str(quant), "--max-batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "holds other weights than when this folder was made" in out
    assert "reference" not in out.splitlines()[-3]  # the metric table has no reference column


def test_prune_writes_its_folder_and_says_so_when_the_runs_data_is_gone(tmp_path, capsys):
    """The evaluation after pruning reads the run's data; where that is gone the pruned folder is
    still complete, so the command succeeds and says what it could not do (an error after the
    write sent users into a loop: the next try refused the existing --out)."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(200):  # ~5% of documents land in validation: enough for a non-empty split
        (data / f"{i}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * 4)
    run = _train(
        tmp_path / "run",
        model="nano",
        data=str(data),
        steps=2,
        seq_len=32,
        batch_size=4,
        eval_batches=1,
    )
    shutil.rmtree(data)
    capsys.readouterr()
    assert main(["prune", str(run), "--pattern", "2:4"]) == 0
    assert "not evaluated" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "run-2of4"), "--to", "int8"]) == 0


def test_a_damaged_or_foreign_weights_file_is_one_line_naming_the_source(lm_run, tmp_path, capsys):
    """A model.safetensors cut short (a copy that stopped) or taken from another folder is an
    error naming the file and the run to quantize again, not a traceback."""
    int8, int4 = tmp_path / "int8", tmp_path / "int4"
    assert main(["quantize", str(lm_run), "--to", "int8", "--out", str(int8)]) == 0
    assert main(["quantize", str(lm_run), "--to", "int4", "--out", str(int4)]) == 0
    shutil.copy(int4 / "model.safetensors", int8 / "model.safetensors")
    capsys.readouterr()
    assert main(["eval", str(int8)]) == 2
    one_line_error(capsys, "its tensors do not fit the layers quantization.json names (size")
    with open(int4 / "model.safetensors", "r+b") as file:
        file.truncate(1000)
    for command in (["eval", str(int4)], ["export", str(int4), "--out", str(tmp_path / "hf")]):
        assert main(command) == 2
        one_line_error(capsys, "unreadable (Error while deserializing header")
    assert main(["quantize", str(int4), "--to", "int8", "--out", str(tmp_path / "q")]) == 2
    one_line_error(capsys, f"fix: write it again from {lm_run.resolve()}")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "q").exists()
