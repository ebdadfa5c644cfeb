"""Session 43: an inference folder whose model.safetensors holds the codes of another format
than its quantization.json names (the manifest edited, or a file of a folder from before
session 42's CRC-32 copied in from another quantization of the same run) is refused: the
tensors' shapes fit, and int8 codes loaded into fp8 buffers were converted to fp8 values and
evaluated under the fp8 name without a word."""

from __future__ import annotations

import json

from lowbit.cli import main


def test_codes_of_another_format_than_the_manifest_names_are_refused(lm_run, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(lm_run), "--to", "int8", "--out", str(out)]) == 0
    manifest = json.loads((out / "quantization.json").read_text())
    manifest["quantization"]["format"] = "fp8"
    (out / "quantization.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["eval", str(out), "--max-batches", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"{out / 'model.safetensors'}: its tensors do not fit the layers" in err, err
    assert "qweight is int8 in the file, float8_e4m3fn in the layer" in err, err
