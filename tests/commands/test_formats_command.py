import numpy as np
import torch
from safetensors.torch import save_file

from lowbit.cli import main


def test_formats_table_lists_every_format(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    for name in [
        "fp32",
        "tf32",
        "bf16",
        "fp16",
        "fp8_e4m3",
        "fp6_e2m3",
        "fp4_e2m1",
        "e8m0",
        "int4",
    ]:
        assert f"\n{name} " in out
    assert "448" in out and "57344" in out


def test_formats_error_table_on_a_checkpoint(tmp_path, capsys):
    path = tmp_path / "model.safetensors"
    save_file({"layer.weight": torch.randn(32, 64), "layer.bias": torch.randn(32)}, str(path))
    assert main(["formats", "--tensor", str(path)]) == 0
    out = capsys.readouterr().out
    assert "layer.weight" in out and "layer.bias" in out and "fp4_e2m1/mx" in out
    pt = tmp_path / "x.pt"
    torch.save(torch.randn(16, 16), pt)
    assert main(["formats", "--tensor", str(pt)]) == 0


def test_formats_bad_file_is_a_one_line_error(tmp_path, capsys):
    assert main(["formats", "--tensor", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error:") and err.count("\n") == 1
    junk = tmp_path / "junk.pt"
    junk.write_text("not a tensor")
    assert main(["formats", "--tensor", str(junk)]) == 2


def test_formats_reads_the_model_of_a_lowbit_checkpoint(tmp_path, capsys):
    # the layout lowbit.train saves: numpy's RNG state in it made a safe torch.load refuse the file
    state = {
        "step": 6,
        "model": {"layer.weight": torch.randn(8, 32)},
        "optimizer": {"state": {0: {"exp_avg": torch.randn(8, 32)}}},
        "rng": {"numpy": np.random.get_state()},
    }
    torch.save(state, tmp_path / "step-0000006.pt")
    assert main(["formats", "--tensor", str(tmp_path / "step-0000006.pt")]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [row.split()[0] for row in rows] == ["layer.weight"]  # no optimizer moments


def test_formats_reads_the_safetensors_of_a_folder(tmp_path, capsys):
    save_file({"a.weight": torch.randn(4, 32)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b.weight": torch.randn(4, 32)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    assert main(["formats", "--tensor", str(tmp_path)]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [row.split()[0] for row in rows] == ["a.weight", "b.weight"]


def test_formats_bad_inputs_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "garbage.safetensors").write_bytes(b"\0\0\0\0\0")
    (tmp_path / "empty").mkdir()
    for path, message in [
        (tmp_path / "garbage.safetensors", "not a safetensors file (Error while deserializing"),
        (tmp_path / "empty", "a folder, with no .safetensors or pytorch_model.bin file in it"),
        (tmp_path / "missing.pt", "no such file; fix: pass a .pt or .safetensors file"),
    ]:
        assert main(["formats", "--tensor", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"lowbit: error: {path}: {message}") and err.count("\n") == 1


def test_formats_measures_the_finite_entries_and_says_so(tmp_path, capsys):
    tensors = {"w": torch.tensor([1.0, float("inf"), 2.0, float("nan")] * 8), "x": torch.randn(32)}
    tensors["void"] = torch.full((4,), float("nan"))
    save_file(tensors, str(tmp_path / "t.safetensors"))
    assert main(["formats", "--tensor", str(tmp_path / "t.safetensors")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[:3] == ["w", "inf", "inf"]  # 1 and 2 are exact in bf16 and fp16
    assert "nan" not in lines[2] + lines[3]
    assert lines[4:] == [  # in the file's order (safetensors sorts by name)
        "note: void: every entry is inf or NaN, so it has no SQNR",
        "note: w: 16 of 32 entries are inf or NaN; its SQNR is over the finite ones, quantized "
        "with those set to 0",
    ]
