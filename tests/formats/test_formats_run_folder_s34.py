"""`lowbit formats --tensor` on a run folder that has no checkpoint to measure yet."""

from lowbit.cli import main


def test_a_run_folder_without_a_checkpoint_says_so_and_how_to_get_one(tmp_path, capsys):
    """A run that stopped before its first save (or is still before it) was refused as "a folder,
    with no .safetensors file in it; fix: pass ... or a lowbit run folder": what it was given."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("recipe: fp32\n")
    assert main(["formats", "--tensor", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lowbit: error: {run}: a lowbit run folder that has saved no checkpoint")
    assert f"--out {run})" in err and "or a lowbit run folder" not in err
    assert err.count("\n") == 1
