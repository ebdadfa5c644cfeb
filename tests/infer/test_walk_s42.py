"""Session 42's walk after training: quantize, prune, eval, generate and export a run's folder."""

import json

from lowbit.cli import main


def _flip_last_byte(file) -> None:
    """Change the file's last byte (the data of the tensor stored last), its header intact."""
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01
    file.write_bytes(bytes(data))


def test_a_folder_whose_tensor_bytes_changed_is_refused(digits_run, tmp_path, capsys):
    """safetensors checks its header only: an inference folder whose tensor bytes changed on the
    disk (a bit flipped, bytes overwritten) was evaluated, quantized or exported from other
    weights without a word, where a checkpoint so changed is refused (its CRC-32s). The folder
    records its file's CRC-32 and refuses a file that no longer matches it, in one line."""
    out = tmp_path / "q"
    assert main(["quantize", str(digits_run), "--to", "int8", "--out", str(out)]) == 0
    assert main(["eval", str(out), "--max-batches", "1", "--quiet"]) == 0
    capsys.readouterr()
    _flip_last_byte(out / "model.safetensors")
    expected = (
        f"lowbit: error: {out / 'model.safetensors'}: its bytes changed since it was written "
        "(their CRC-32 no longer matches the one quantization.json records); fix: write it again "
        f"from {digits_run.resolve()} (lowbit quantize/prune)"
    )
    assert main(["eval", str(out), "--max-batches", "1", "--quiet"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [expected]

    # written again (--force over it), it is read again
    argv = ["quantize", str(digits_run), "--to", "int8", "--out", str(out), "--force"]
    assert main(argv) == 0
    assert main(["eval", str(out), "--max-batches", "1", "--quiet"]) == 0


def test_a_changed_pruned_folder_is_not_quantized_and_a_folder_from_before_loads(
    lm_run, tmp_path, capsys
):
    """A pruned folder whose bytes changed is not quantized or exported (nothing is written); a
    folder quantized from it before is evaluated without it as a reference, with a note why; and
    a folder written before session 42, which records no CRC-32, loads as before."""
    pruned, earlier = tmp_path / "pruned", tmp_path / "earlier"
    argv = ["prune", str(lm_run), "--sparsity", "0.5", "--max-batches", "1", "--out", str(pruned)]
    assert main(argv) == 0
    assert main(["quantize", str(pruned), "--to", "int8", "--out", str(earlier)]) == 0
    manifest = json.loads((pruned / "quantization.json").read_text())
    _flip_last_byte(pruned / "model.safetensors")
    capsys.readouterr()
    assert main(["eval", str(earlier), "--max-batches", "1", "--quiet"]) == 0
    note = (
        f"(no reference to compare against: {pruned / 'model.safetensors'}: its bytes changed "
        "since it was written (their CRC-32 no longer matches the one quantization.json records); "
        f"to compare against it, write it again from {lm_run.resolve()} (lowbit quantize/prune))"
    )
    assert note in capsys.readouterr().out.splitlines()
    assert main(["quantize", str(pruned), "--to", "int4", "--out", str(tmp_path / "q")]) == 2
    assert main(["export", str(pruned), "--out", str(tmp_path / "hf")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all("its bytes changed since it was written" in e for e in errors)
    assert not (tmp_path / "q").exists() and not (tmp_path / "hf").exists()

    del manifest["crc32"]
    (pruned / "quantization.json").write_text(json.dumps(manifest))
    assert main(["export", str(pruned), "--out", str(tmp_path / "hf")]) == 0


def test_a_folder_is_evaluated_when_its_pruned_source_is_cut_short(lm_run, tmp_path, capsys):
    """Review R7: only a source whose CRC-32 changed gave way to a note; a source cut short (or
    otherwise unreadable) refused `eval` of the intact folder quantized from it."""
    pruned, quantized = tmp_path / "pruned", tmp_path / "quantized"
    argv = ["prune", str(lm_run), "--sparsity", "0.5", "--max-batches", "1", "--out", str(pruned)]
    assert main(argv) == 0
    assert main(["quantize", str(pruned), "--to", "int8", "--out", str(quantized)]) == 0
    weights = pruned / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    capsys.readouterr()
    assert main(["eval", str(quantized), "--max-batches", "1", "--quiet"]) == 0
    (note,) = [x for x in capsys.readouterr().out.splitlines() if "no reference" in x]
    assert note.startswith(f"(no reference to compare against: {weights}"), note
