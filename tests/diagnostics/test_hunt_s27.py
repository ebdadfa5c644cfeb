"""Session 27's hunt through `lowbit doctor`, the statistics, the `auto` recipe and `formats`."""

import json

import torch

from lowbit.cli import main
from lowbit.train import checkpoint

FLAGS = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]


def test_doctor_of_a_checkpoint_with_non_finite_weights_names_them_not_bf16_overrides(
    tmp_path, capsys
):
    """A checkpoint whose weights hold NaN (a run that diverged) made every probe step
    non-finite; the doctor flagged dozens of operands and suggested putting them all in bf16,
    which fixes nothing: the weights are the cause."""
    run = tmp_path / "run"
    train = ["train", *FLAGS, "--recipe", "fp8-tensorwise", "--steps", "2", "--eval-interval", "2"]
    assert main([*train, "--quiet", "--out", str(run)]) == 0
    path = checkpoint.latest(run)
    state = torch.load(path, weights_only=False)
    state["model"]["model.layers.1.mlp.down_proj.weight"][0, :3] = float("nan")
    torch.save(state, path)
    capsys.readouterr()

    out = tmp_path / "d"
    argv = ["doctor", "--checkpoint", str(run), "--probe-steps", "1", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "doctor.json").read_text())
    (flag,) = [f for f in report["flags"] if f["pattern"] == "non-finite-weights"]
    assert flag["parameters"] == ["model.layers.1.mlp.down_proj.weight"]
    assert "3 of" in flag["detail"]
    assert report["suggestions"] == []
    assert "[non-finite-weights]" in printed
    assert "--override" not in printed
    assert "the weights were inf or NaN before the probe" in printed


def test_doctor_table_columns_stay_aligned_for_long_layer_names(tmp_path, capsys):
    """A tagger's layer names (``bert.encoder.layer.1.attention.output.dense``, 43 characters)
    overran the 34-character layer column and pushed the rest of their rows out of line with
    the header."""
    argv = ["doctor", "--task", "token-classification", "--recipe", "fp8-tensorwise"]
    argv += ["--batch-size", "4", "--probe-steps", "1", "--top", "200"]
    assert main([*argv, "--out", str(tmp_path / "d")]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("# layer"))
    rows = [line for line in lines if line[:3].strip().isdigit()]
    assert any(len(line.split()[1]) > 34 for line in rows)
    column = header.index("operand")
    for line in rows:
        assert line[column - 1] == " " and line[column] != " ", line
        assert line.split()[2] == line[column:].split()[0]
    assert lines[0].startswith("lowbit doctor: recipe fp8-tensorwise, 1 probe step; ")


def test_formats_reads_the_checkpoint_of_an_auto_run(tmp_path, capsys):
    """`lowbit formats --tensor` refused the checkpoint of any `auto` run ("cannot read it as a
    torch file (Unsupported global: ... LayerSpec ...)"): the run keeps each layer's plan as a
    `LayerSpec`, which its safe load did not allow."""
    run = tmp_path / "run"
    train = ["train", *FLAGS, "--recipe", "auto", "--steps", "1", "--eval-interval", "1"]
    assert main([*train, "--quiet", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["formats", "--tensor", str(checkpoint.latest(run))]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert "model.layers.0.mlp.down_proj.weight" in [row.split()[0] for row in rows]


def test_formats_reads_a_multi_process_checkpoint_folder(tmp_path, capsys):
    """A multi-process run's checkpoint is a ``step-N.dcp`` folder: `lowbit formats --tensor`
    took it for a folder of safetensors and said it held none ("fix: pass a .pt or
    .safetensors file"), though the run has no other checkpoint."""
    run = tmp_path / "run"
    train = ["train", *FLAGS, "--strategy", "ddp", "--steps", "1", "--eval-interval", "1"]
    assert main([*train, "--quiet", "--out", str(run)]) == 0
    capsys.readouterr()
    folder = checkpoint.latest(run)
    assert folder.suffix == ".dcp" and folder.is_dir()
    assert main(["formats", "--tensor", str(folder)]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    names = [row.split()[0] for row in rows]
    assert "model.layers.0.mlp.down_proj.weight" in names
    assert not any("exp_avg" in name for name in names)  # the model, not optimizer moments


def test_doctor_probes_an_earlier_checkpoint_of_a_run_given_by_its_path(tmp_path, capsys):
    """`--checkpoint RUN/checkpoints/step-N.pt` was refused ("no config.yaml, not a lowbit run
    folder; fix: check the path"): only a run's latest checkpoint could be probed, not the one
    saved before it diverged."""
    run = tmp_path / "run"
    train = ["train", *FLAGS, "--recipe", "fp8-tensorwise", "--steps", "2", "--eval-interval", "1"]
    assert main([*train, "--quiet", "--out", str(run)]) == 0
    earlier, latest = checkpoint.list_checkpoints(run)
    state = torch.load(latest, weights_only=False)
    state["model"]["model.layers.0.mlp.up_proj.weight"][0, 0] = float("inf")
    torch.save(state, latest)
    capsys.readouterr()

    def flags(given):
        out = tmp_path / given.name
        argv = ["doctor", "--checkpoint", str(given), "--probe-steps", "1", "--out", str(out)]
        assert main(argv) == 0
        return [f["pattern"] for f in json.loads((out / "doctor.json").read_text())["flags"]]

    assert "non-finite-weights" in flags(run)
    capsys.readouterr()
    assert "non-finite-weights" not in flags(earlier)
    assert "probe stopped" not in capsys.readouterr().out
