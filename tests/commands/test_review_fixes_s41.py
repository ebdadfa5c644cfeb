"""Session 41, reviews R5 and R7: an unknown flag found before argparse's own checks, and what an
--overwrite run that stopped early says it left."""

import pytest

from lowbit.cli import main
from lowbit.train import checkpoint
from lowbit.train.runstate import checkpoints_present, kept_text


@pytest.mark.parametrize(
    "argv, line",
    [
        # a shortened required flag: argparse reported the required one missing, in its usage
        (
            ["compare", "--recipe", "fp32,bf16-mixed", "--steps", "1"],
            "compare --recipe: unrecognized argument (a flag is taken only in full); fix: did you "
            "mean '--recipes'",
        ),
        (["estimate", "--mod", "nano"], "estimate --mod: unrecognized argument (a flag is taken"),
        # a --no-X spelling shares --X's help, which says the opposite: no gist
        (["train", "--no-wand"], "fix: did you mean '--no-wandb'?"),
        # `--` names nothing: what follows it does
        (["train", "--", "extra"], "train extra: unrecognized argument"),
        # a flag before the command is not the command's
        (["--bogus", "train"], "--bogus: unrecognized argument; fix: see lowbit --help"),
    ],
)
def test_an_unknown_flag_is_one_line_naming_it(argv, line, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and line in err[0], err


def test_an_overwrite_run_that_saved_nothing_does_not_offer_the_replaced_runs_checkpoint(tmp_path):
    """Review R7: told apart by the files' own marks (an --overwrite run's start compared with a
    checkpoint's modification time read a network file system's lagging server clock as "older")."""
    run = tmp_path / "run"
    old = checkpoint.path_for(run, 2)
    old.parent.mkdir(parents=True)
    old.write_bytes(b"the run replaced")
    replaced = checkpoints_present(run)
    assert kept_text(run, replaced).startswith("this run wrote no checkpoint of its own")
    # the new run saves the same step under the same name: a new file, its own
    new = old.with_suffix(".tmp")
    new.write_bytes(b"this run's")
    new.replace(old)
    assert kept_text(run, replaced).startswith(f"the last complete checkpoint {old} is intact")
    assert kept_text(tmp_path / "none", checkpoints_present(tmp_path / "none")).startswith(
        "no checkpoint was written"
    )
