from lowbit.cli import main


def test_prune_names_one_validation_batch_in_the_singular(lm_run, tmp_path, capsys):
    """`lowbit prune --max-batches 1` printed "validation (1 batches)"."""
    out = tmp_path / "pruned"
    assert (
        main(["prune", str(lm_run), "--pattern", "2:4", "--max-batches", "1", "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "validation (1 batch), reference = the unpruned run:" in printed
    assert main(["prune", str(lm_run), "--sparsity", "0.5", "--out", str(tmp_path / "p2")]) == 0
    assert "validation (2 batches), reference" in capsys.readouterr().out  # the run's eval_batches
