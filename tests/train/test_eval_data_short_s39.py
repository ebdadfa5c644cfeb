"""Session 39: `lowbit eval RUN --data PATH` of a causal LM on text shorter than one window of the
run's --seq-len + 1 was refused as "the validation split holds N tokens ...; fix: ... a shorter
--seq-len": a file is evaluated whole (no split), and eval has no --seq-len (it keeps the run's),
so the fix named a flag the command does not take. The refusal names the data and asks for more
text."""

import pytest

from lowbit.cli import main
from tests.once import folder_once_per_session

LM = ["train", "--model", "nano", "--seq-len", "16", "--batch-size", "4", "--steps", "1"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A causal-LM run on a small text file, trained once per session (read only)."""

    def make(folder):
        text = folder / "text.txt"  # faster to read than the stdlib
        text.write_text("\n\n".join(f"def f{i}(x):\n    return x + {i}" for i in range(100)))
        run = folder / "lm"
        argv = [*LM, "--data", str(text), "--eval-batches", "1", "--quiet", "--out", str(run)]
        assert main(argv) == 0
        return run

    return folder_once_per_session(tmp_path_factory, "eval-data-short-s39", make)


def test_a_text_file_shorter_than_a_window_is_refused_with_a_fix_eval_takes(
    lm_run, tmp_path, capsys
):
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n")  # 6 byte tokens; a window is 16 + 1
    capsys.readouterr()
    assert main(["eval", str(lm_run), "--data", str(short), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"--data {short} holds 6 tokens" in err and "split" not in err
    assert "fix: give at least 17 tokens of text" in err and "shorter --seq-len" not in err


def test_a_folder_whose_split_is_short_names_the_folder_and_its_split(lm_run, tmp_path, capsys):
    folder = tmp_path / "texts"
    for split, text in (("train", "a" * 200), ("validation", "b" * 200), ("test", "c" * 5)):
        (folder / split).mkdir(parents=True)
        (folder / split / "doc.txt").write_text(text)
    capsys.readouterr()
    argv = ["eval", str(lm_run), "--data", str(folder), "--split", "test", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"--data {folder}: the test split holds 5 tokens" in err, err
    assert "shorter --seq-len" not in err
