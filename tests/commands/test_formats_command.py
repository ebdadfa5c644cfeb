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
