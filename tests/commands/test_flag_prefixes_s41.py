"""A flag is taken only as spelt in full: argparse took any unique prefix, so `lowbit compare
--seed 2` trained 2 seeds from seed 0 (--seeds 2), and a prefix unique today breaks a script the
day a flag that shares it is added. A shortened or mistyped flag is refused in one line that names
the flags it may mean, each with the gist of its help."""

import pytest

from lowbit.cli import main


def _refusal(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    return err.strip()


SEEDS = "'--seeds' (seeds per recipe) or '--first-seed' (seeds are N, N+1, ...)"


@pytest.mark.parametrize(
    "argv, meant",
    [
        (["compare", "--recipes", "fp32", "--seed", "2"], SEEDS),
        (["compare", "--recipes", "fp32", "--seed=2"], SEEDS),
        (["train", "--seq", "64"], "'--seq-len' (tokens per example)"),
        (
            ["train", "--eval", "5"],
            "'--eval-interval' (steps between validation evaluations) or "
            "'--eval-batches' (validation batches per evaluation)",
        ),
        (["estimate", "--model", "nano", "--gpu", "2"], "'--gpus' (data-parallel devices)"),
        (["--vers"], "'--version' (show program's version number and exit)"),
    ],
    ids=["compare-seed", "compare-seed=", "train-seq", "train-eval", "estimate-gpu", "version"],
)
def test_a_shortened_flag_is_refused_with_the_flags_it_may_mean(capsys, tmp_path, argv, meant):
    if argv[0] in ("compare", "train"):  # without the fix, the prefix taken, they got this far
        argv = [*argv, "--steps", "0", "--out", str(tmp_path / "run")]
    given = next(arg for arg in argv if arg.startswith(("--se", "--ev", "--gpu", "--vers")))
    command = "" if argv[0] == given else f"{argv[0]} "
    line = _refusal(capsys, argv)
    assert line == (
        f"lowbit: error: {command}{given.split('=')[0]}: unrecognized argument (a flag is taken "
        f"only in full); fix: did you mean {meant}?"
    )
    assert not (tmp_path / "run").exists()


def test_a_commands_own_second_spelling_still_works(capsys):
    """estimate's --seq, --nproc and --strategy are spellings of --seq-len, --gpus and
    --sharding that it names on purpose: still taken (the refusal is of the flag after them),
    where a prefix of them is not."""
    argv = ["estimate", "--model", "nano", "--seq", "16", "--nproc", "2", "--strategy", "ddp"]
    line = _refusal(capsys, [*argv, "--shard", "fsdp"])
    assert line == (
        "lowbit: error: estimate --shard: unrecognized argument (a flag is taken only in full); "
        "fix: did you mean '--sharding' (none, ddp, fsdp)?"
    )


def test_a_mistyped_flag_is_one_line_naming_the_near_miss(capsys, tmp_path):
    """argparse printed the whole usage and "unrecognized arguments: --seedd 3"."""
    line = _refusal(capsys, ["train", "--seedd", "3", "--out", str(tmp_path / "run")])
    assert line == (
        "lowbit: error: train --seedd: unrecognized argument; fix: did you mean "
        "'--seed' (seed of initialization, data order and sampling)?"
    )


def test_a_flag_refused_on_purpose_is_not_suggested(capsys, tmp_path):
    """compare takes --nproc only to refuse it: `--npro` is no flag to point the user to (it
    was taken as --nproc, and refused as one)."""
    line = _refusal(capsys, ["compare", "--recipes", "fp32", "--npro", "2"])
    assert line == (
        "lowbit: error: compare --npro: unrecognized argument; fix: see lowbit compare --help"
    )
