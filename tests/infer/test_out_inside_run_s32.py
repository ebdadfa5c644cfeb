"""An --out inside the training run that a pruned folder came from: the run's checkpoints/ and
tokenizer/ are as much the source's as a run's own (`lowbit.infer.io.check_outside`)."""

import shutil

import pytest

from lowbit.cli import main
from lowbit.infer import prune_run


@pytest.mark.parametrize(
    ("command", "inside"),
    [
        (["quantize", "--to", "int8"], "checkpoints/step-0000099.dcp"),
        (["export"], "tokenizer/hf"),
    ],
)
def test_out_inside_the_run_a_pruned_folder_came_from_is_refused(
    lm_run, tmp_path, capsys, command, inside
):
    """Quantized from a pruned folder into its run's checkpoints/, the new folder was taken for
    the run's newest checkpoint (`lowbit eval RUN`: "unreadable checkpoint"); exported into its
    tokenizer/, it was copied into every folder quantized from the run since."""
    run = shutil.copytree(lm_run, tmp_path / "run")
    pruned = prune_run(run, sparsity=0.3, out=tmp_path / "run-sparse30").out
    capsys.readouterr()
    out = run / inside
    assert main([command[0], str(pruned), *command[1:], "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {out} is inside {inside.split('/')[0]}/ of" in err
    assert "the run the source came from; fix: choose a folder outside it" in err
    assert not out.exists()
