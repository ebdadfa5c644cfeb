"""Session 34 hunt of `lowbit doctor`'s outputs and statistics."""

import errno
import json
from pathlib import Path

from lowbit.cli import main

BASE = ["--seq-len", "32", "--batch-size", "4", "--device", "cpu", "--probe-steps", "1"]


def test_a_full_disk_while_writing_doctor_json_keeps_the_earlier_report(
    tmp_path, monkeypatch, capsys
):
    """doctor.json was written in place: a disk that filled up (or a kill) mid-write left a torn
    JSON file where the previous probe's whole report had been."""
    out = tmp_path / "doctor"
    out.mkdir()
    earlier = json.dumps({"recipe": "fp8-tensorwise", "rows": []}) + "\n"
    (out / "doctor.json").write_text(earlier)
    write_text = Path.write_text

    def disk_fills_up(self, text, *args, **kwargs):
        if "doctor.json" in self.name:  # half of the report lands, then the disk is full
            write_text(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_fills_up)
    argv = ["doctor", *BASE, "--recipe", "fp8-tensorwise", "--out", str(out), "--overwrite"]
    assert main(argv) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert (out / "doctor.json").read_text() == earlier
    assert sorted(p.name for p in out.iterdir()) == ["doctor.json"]  # no temporary file left


def test_model_weights_beyond_fp16_are_refused_before_the_probe(tmp_path, capsys):
    """A --model folder with a weight beyond fp16's 65504 probed under fp16-low: the recipe's
    fp16 parameters held it as inf, and the doctor's fix was "probe an earlier checkpoint, or
    train from scratch", for a probe that had no checkpoint and trained from scratch. The
    conversion now refuses the weight in one line, naming it and the recipes that hold it."""
    folder = _llama_with_a_large_weight(tmp_path / "llama")
    out = tmp_path / "doctor"
    argv = ["doctor", *BASE, "--model", str(folder), "--recipe", "fp16-low", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "lowbit: error: model.layers.0.mlp.up_proj.weight holds 1e+06, beyond fp16's largest "
        "value 65504: fp16-low's fp16 parameters would hold it as inf; fix: a recipe with fp32 "
        "parameters (fp16-mixed, bf16-mixed) or bf16 ones (bf16-low)"
    )
    assert "Traceback" not in err and not out.exists()


def _llama_with_a_large_weight(folder):
    from safetensors.torch import load_file, save_file

    from tests.llama import save_llama

    save_llama(folder)
    weights = load_file(folder / "model.safetensors")
    name = next(k for k in weights if "layers.0.mlp.up_proj" in k)
    weights[name][0, 0] = 1e6
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_a_checkpoint_path_the_run_lacks_names_the_checkpoints_it_has(tmp_path, capsys):
    """--checkpoint RUN/checkpoints/step-2.pt (the help's step-N.pt, for step-0000002.pt) was
    refused as "no such run folder (no config.yaml); fix: give the --out folder of a run": the
    run was there, the checkpoint's name was wrong, and neither was said."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("recipe: fp8-tensorwise\n")
    for step in (2, 4):
        (run / "checkpoints" / f"step-{step:07d}.pt").write_bytes(b"")
    argv = ["doctor", "--checkpoint", str(run / "checkpoints" / "step-2.pt"), "--out", "d"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "step-2.pt: no such checkpoint" in err and "step-0000004.pt" in err, err
    assert f"fix: --checkpoint {run / 'checkpoints' / 'step-0000002.pt'}" in err
    assert len(err.strip().splitlines()) == 1
    # a path that is there but no checkpoint (a step folder without .dcp) is not called missing
    (run / "checkpoints" / "step-0000003").mkdir()
    argv[2] = str(run / "checkpoints" / "step-0000003")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "step-0000003: not a lowbit checkpoint (" in err and "no such" not in err, err


def test_a_full_disk_while_drawing_doctor_png_keeps_the_earlier_heat_map(
    tmp_path, monkeypatch, capsys
):
    """doctor.png was saved in place: a disk that filled up mid-save left a torn image."""
    from matplotlib.figure import Figure

    out = tmp_path / "doctor"
    out.mkdir()
    earlier = b"\x89PNG an earlier heat map"
    (out / "doctor.png").write_bytes(earlier)

    def disk_fills_up(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG torn")
        raise OSError(errno.ENOSPC, "No space left on device", str(fname))

    monkeypatch.setattr(Figure, "savefig", disk_fills_up)
    argv = ["doctor", *BASE, "--recipe", "fp8-tensorwise", "--out", str(out), "--overwrite"]
    assert main(argv) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert (out / "doctor.png").read_bytes() == earlier
    assert sorted(p.name for p in out.iterdir()) == ["doctor.json", "doctor.png"]
