"""Session 25's second hunt through the inference commands: flags that do nothing or are checked
late, a folder without its config.yaml, and folders made before quantize read master weights."""

import json
import shutil

import pytest

from lowbit.cli import main
from lowbit.infer import io, load_source
from lowbit.infer.evaluate import fp32_precision
from tests.infer.conftest import _train
from tests.infer.test_hunt_s24 import one_line_error


@pytest.mark.parametrize("to", ["int8", "fp8"])
def test_pad_groups_without_groups_is_refused(lm_run, tmp_path, capsys, to):
    """int8 and fp8 keep one scale per row unless --group-size is given: --pad-groups had
    nothing to pad and was accepted silently; now it is refused before anything is read."""
    out = tmp_path / "q"
    assert main(["quantize", str(lm_run), "--to", to, "--pad-groups", "--out", str(out)]) == 2
    one_line_error(capsys, "--pad-groups")
    assert not out.exists()
    grouped = ["--group-size", "8", "--pad-groups", "--out", str(out)]
    assert main(["quantize", str(lm_run), "--to", to, *grouped]) == 0
    assert json.loads((out / "quantization.json").read_text())["quantization"]["group_size"] == 8


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--max-new-tokens", "-1", "--max-new-tokens -1 is negative"),
        ("--temperature", "-0.5", "temperature -0.5 is not a finite value >= 0"),
        ("--temperature", "nan", "temperature nan is not a finite value >= 0"),
        ("--temperature", "inf", "temperature inf is not a finite value >= 0"),
        ("--top-k", "-3", "--top-k -3 is negative"),
        ("--seed", "-1", "seed must be in [0, 2**32), got -1"),
    ],
)
def test_generate_refuses_a_bad_number_before_loading(tmp_path, capsys, flag, value, message):
    """generate loaded the model (seconds for a large one) before refusing a negative
    --max-new-tokens; now a folder that is not even there shows the check comes first."""
    missing = tmp_path / "no-such-run"
    assert main(["generate", str(missing), flag, value]) == 2
    err = one_line_error(capsys, message)
    assert "no such" not in err


def test_an_inference_folder_without_config_yaml_says_what_is_missing(lm_run, tmp_path, capsys):
    """A quantized folder that lost its config.yaml was "not a lowbit run folder; fix: check
    the path" for every command; now the error names the missing file and where to copy it
    from."""
    folder = tmp_path / "q"
    assert main(["quantize", str(lm_run), "--to", "int8", "--out", str(folder)]) == 0
    (folder / "config.yaml").unlink()
    capsys.readouterr()
    for command in (
        ["eval", str(folder)],
        ["generate", str(folder), "--max-new-tokens", "1"],
        ["export", str(folder), "--out", str(tmp_path / "hf")],
        ["quantize", str(folder), "--to", "int4"],
        ["prune", str(folder), "--sparsity", "0.5"],
    ):
        assert main(command) == 2, command
        err = one_line_error(capsys, "without its config.yaml")
        assert f"copy config.yaml back from {lm_run.resolve()}" in err
    shutil.copy2(lm_run / "config.yaml", folder / "config.yaml")
    assert main(["eval", str(folder), "--max-batches", "1"]) == 0


def test_eval_of_a_folder_made_from_16_bit_weights_keeps_its_reference(
    tmp_path, capsys, monkeypatch
):
    """A folder quantized from a bf16-low run before quantize read the fp32 master weights was
    made from the 16-bit parameters and recorded their digest: eval took the masters for other
    weights ("trained or pruned again in its place") and showed no reference. Now the 16-bit
    weights, the ones quantized, are its reference; another digest still has none."""
    settings = {"steps": 2, "seq_len": 16, "batch_size": 2, "eval_batches": 1, "lr": 1e-2}
    run = _train(tmp_path / "run", model="nano", recipe="bf16-low", **settings)
    old, new = tmp_path / "old", tmp_path / "new"
    with monkeypatch.context() as before_masters:  # quantize as lowbit did before the masters
        before_masters.setattr(io, "_load_master_weights", lambda *args: [])
        assert main(["quantize", str(run), "--to", "int8", "--out", str(old)]) == 0
        rounded = load_source(run)
    masters = load_source(run)
    assert main(["quantize", str(run), "--to", "int8", "--out", str(new)]) == 0
    for folder, source in ((old, rounded), (new, masters)):
        capsys.readouterr()
        assert main(["eval", str(folder), "--max-batches", "1", "--json"]) == 0
        expected = source.task.evaluate(source.model, fp32_precision(), "validation", 1)
        assert json.loads(capsys.readouterr().out)["baseline"] == expected, folder
    assert rounded.task.evaluate(rounded.model, fp32_precision(), "validation", 1) != expected
    manifest = json.loads((old / "quantization.json").read_text())
    manifest["source"]["weights"] = "0" * 32  # a source trained again in its place
    (old / "quantization.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["eval", str(old), "--max-batches", "1"]) == 0
    assert "holds other weights than when this folder was made" in capsys.readouterr().out


def test_force_keeps_files_that_lowbit_did_not_write(lm_run, tmp_path, capsys):
    """--force "replaces what an earlier quantize, prune or export wrote", yet it replaced (and
    deleted) a user's own config.yaml, or a downloaded model's config.json and weights, in a
    folder no lowbit command had written; now those are refused, and what lowbit wrote is still
    replaced."""
    project, model = tmp_path / "project", tmp_path / "hf-model"
    project.mkdir()
    model.mkdir()
    (project / "config.yaml").write_text("mine: 1\n")
    (model / "config.json").write_text("{}\n")
    (model / "model.safetensors").write_bytes(b"downloaded")
    capsys.readouterr()
    for command in (
        ["quantize", str(lm_run), "--to", "int8", "--out", str(project), "--force"],
        ["prune", str(lm_run), "--sparsity", "0.5", "--out", str(project), "--force"],
        ["export", str(lm_run), "--out", str(model), "--force"],
    ):
        assert main(command) == 2, command
        one_line_error(capsys, "that no lowbit quantize, prune or export wrote")
    assert sorted(p.name for p in project.iterdir()) == ["config.yaml"]
    assert (project / "config.yaml").read_text() == "mine: 1\n"
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
    assert (model / "model.safetensors").read_bytes() == b"downloaded"
    folder = tmp_path / "q"
    assert main(["quantize", str(lm_run), "--to", "int8", "--out", str(folder)]) == 0
    assert main(["export", str(lm_run), "--out", str(folder), "--force"]) == 0
    assert (folder / "lowbit_export.json").is_file()
    assert not (folder / "quantization.json").exists()


def test_a_folder_that_lost_its_quantization_json_is_not_told_to_train_first(
    lm_run, tmp_path, capsys
):
    """eval and generate of a quantized folder without its manifest said "no checkpoint in
    checkpoints/; fix: train first", as if it were an empty run folder."""
    folder = tmp_path / "q"
    assert main(["quantize", str(lm_run), "--to", "int8", "--out", str(folder)]) == 0
    (folder / "quantization.json").unlink()
    capsys.readouterr()
    for command in (["eval", str(folder)], ["generate", str(folder), "--max-new-tokens", "1"]):
        assert main(command) == 2, command
        err = one_line_error(capsys, "model.safetensors without the quantization.json")
        assert "train first" not in err
