"""Session 37: `lowbit quantize` of a folder that is already quantized, and `lowbit prune` of one
already pruned, say so before their default --out (there from the step that made the folder) is
refused as not empty; a damaged or config-less folder's own error still comes first
(tests/infer/test_hunt_s23.py, test_hunt_s25b.py)."""

from lowbit.cli import main
from lowbit.infer import io


def test_quantizing_a_quantized_folder_is_refused_before_its_default_out(lm_run, tmp_path, capsys):
    quant = tmp_path / "q"
    assert main(["quantize", str(lm_run), "--to", "int8", "--out", str(quant)]) == 0
    (tmp_path / "q-int8").mkdir()  # the default --out of quantizing q, from an earlier try
    (tmp_path / "q-int8" / "notes.txt").write_text("mine\n")
    capsys.readouterr()
    assert main(["quantize", str(quant), "--to", "int8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"lowbit: error: {quant} is already quantized (int8 "), err
    assert err.rstrip().endswith(f"fix: quantize its source, {lm_run.resolve()}"), err
    assert (tmp_path / "q-int8" / "notes.txt").read_text() == "mine\n"


def test_pruning_a_pruned_folder_is_refused_before_its_default_out(lm_run, tmp_path, capsys):
    pruned = tmp_path / "p"
    assert main(["prune", str(lm_run), "--pattern", "2:4", "--out", str(pruned)]) == 0
    (tmp_path / "p-2of4").mkdir()  # the default --out of pruning p again, from an earlier try
    (tmp_path / "p-2of4" / "notes.txt").write_text("mine\n")
    capsys.readouterr()
    assert main(["prune", str(pruned), "--pattern", "2:4"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"lowbit: error: {pruned} is already pruned 2:4; fix: prune the run it came from, "
        f"{lm_run.resolve()}, then quantize\n"
    )
    assert (tmp_path / "p-2of4" / "notes.txt").read_text() == "mine\n"


def test_a_pruned_folders_out_is_checked_before_it_is_loaded(lm_run, tmp_path, capsys, monkeypatch):
    """quantize takes a pruned folder: its --out is refused from the manifest alone, before the
    model is loaded (a full load at 7B, before a one-line refusal)."""
    pruned = tmp_path / "p"
    assert main(["prune", str(lm_run), "--sparsity", "0.5", "--out", str(pruned)]) == 0
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine\n")
    capsys.readouterr()

    def no_load(*args, **kwargs):
        raise AssertionError("loaded before --out was checked")

    monkeypatch.setattr(io, "load_source", no_load)
    assert main(["quantize", str(pruned), "--to", "int8", "--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "taken" in err and "not empty" in err, err


def test_pruning_a_pruned_then_quantized_folder_names_the_run(lm_run, tmp_path, capsys):
    """The fix named the folder it was quantized from, itself pruned and refused in turn."""
    pruned = tmp_path / "p"
    assert main(["prune", str(lm_run), "--sparsity", "0.5", "--out", str(pruned)]) == 0
    assert main(["quantize", str(pruned), "--to", "int8", "--out", str(tmp_path / "pq")]) == 0
    capsys.readouterr()
    assert main(["prune", str(tmp_path / "pq"), "--sparsity", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.rstrip().endswith(
        f"fix: prune the run it came from, {lm_run.resolve()}, then quantize"
    ), err
