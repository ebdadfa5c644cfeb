"""Session 41: `lowbit eval` of an inference folder reads its size from the files.

Quantize and prune record tensor bytes since session 41 (the file's header left out); eval
printed the bytes a folder's quantization.json recorded, so a folder written before then (its
file's size, header included) read 1.83x smaller where a byte-identical new one read 2.00x."""

import json

import pytest
from safetensors.torch import load_file

from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.infer.evaluate import size_change
from lowbit.infer.io import tensor_bytes_of


def stored(folder) -> int:
    """Bytes of the tensors an inference folder's model.safetensors holds."""
    return sum(t.nbytes for t in load_file(folder / "model.safetensors").values())


def size_line(capsys, folder) -> str:
    assert main(["eval", str(folder), "--max-batches", "1", "--quiet"]) == 0
    return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("size:"))


def as_before_s41(folder, **sizes) -> None:
    """Rewrite ``folder``'s recorded bytes as lowbit wrote them before session 41: file sizes."""
    manifest = json.loads((folder / "quantization.json").read_text())
    manifest["bytes"].update(sizes)
    (folder / "quantization.json").write_text(json.dumps(manifest, indent=2) + "\n")


def test_a_folder_that_recorded_its_files_size_reads_as_a_new_one(digits_run, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(digits_run), "--to", "int8", "--out", str(out)]) == 0
    capsys.readouterr()
    new = size_line(capsys, out)
    original = json.loads((out / "quantization.json").read_text())["bytes"]["original"]
    assert f"({size_change(original, stored(out))})" in new, new
    as_before_s41(out, quantized=(out / "model.safetensors").stat().st_size)
    assert size_line(capsys, out) == new


def test_a_pruned_sources_size_is_its_tensors_whatever_was_recorded(lm_run, tmp_path, capsys):
    pruned, quantized = tmp_path / "p", tmp_path / "q"
    argv = ["prune", str(lm_run), "--sparsity", "0.5", "--max-batches", "1"]
    assert main([*argv, "--out", str(pruned)]) == 0
    assert main(["quantize", str(pruned), "--to", "int8", "--out", str(quantized)]) == 0
    capsys.readouterr()
    new = size_line(capsys, quantized)
    assert f"({size_change(stored(pruned), stored(quantized))})" in new, new
    files = {name: (folder / "model.safetensors").stat().st_size for name, folder in
             (("original", pruned), ("quantized", quantized))}  # fmt: skip
    as_before_s41(quantized, **files)
    assert size_line(capsys, quantized) == new


@pytest.mark.parametrize(
    "content", [b"", b"abcd", b"D(1\x02\x081\x16\xc0" + bytes(92)], ids=["empty", "short", "junk"]
)
def test_a_file_too_short_for_its_header_is_refused_in_one_line(tmp_path, content):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(content)
    with pytest.raises(
        UsageError, match=r"model\.safetensors: unreadable \(.*; fix: write it"
    ) as e:
        tensor_bytes_of(weights)
    assert "\n" not in str(e.value)
