"""The warning of validation text that is also training text (tests/data/test_data_hunt_s29.py)
names a fix the user can make: for one file that lowbit split by paragraph, removing its repeated
paragraphs, not "the copies from the validation and test data (the splits are kept as given)",
data that file does not have (session 43, the README tour's docs on `--data docs.txt`)."""

from lowbit.data.corpus import load_corpus, split_of

REPEATED = "The same long paragraph, pasted into the notes again and again over the years."


def _paragraph(i: int) -> str:
    return f"Paragraph {i} holds its own words, {i * 7919 % 1000} and {i * 104729 % 997}, once."


def test_one_files_repeated_paragraphs_are_named_with_a_fix_for_that_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(f"{_paragraph(i)}\n\n{REPEATED}" for i in range(200)))
    (line,) = load_corpus(str(notes)).warnings
    assert "documents have the text of a training document" in line
    fix = line.split("fix: ", 1)[1]
    assert fix.startswith("remove the repeated text from the data") and "as given" not in fix


def test_data_that_comes_split_is_told_to_remove_its_validation_copies(tmp_path):
    data = tmp_path / "data"
    for split in ("train", "valid"):
        (data / split).mkdir(parents=True)
        (data / split / "shared.txt").write_text(REPEATED)
    (data / "train" / "own.txt").write_text(_paragraph(1))
    (line,) = load_corpus(str(data)).warnings
    assert line.endswith(
        "fix: remove the copies from the validation and test data (the splits are kept as given)"
    )


def _train_and_test(data, copies_in_test: int) -> None:
    """``train/`` (two copies of one text, one of them a file whose name draws it into the
    validation split, as `split_of` decides where the data names no validation split) and
    ``test/``, holding ``copies_in_test`` more copies."""
    names = [f"n{i}.txt" for i in range(200)]
    drawn = next(n for n in names if split_of(f"train/{n}") == "validation")
    kept = next(n for n in names if split_of(f"train/{n}") == "train")
    for folder in ("train", "test"):
        (data / folder).mkdir(parents=True)
    for name in (drawn, kept):
        (data / "train" / name).write_text(REPEATED)
    (data / "test" / "own.txt").write_text(_paragraph(2))
    for i in range(copies_in_test):
        (data / "test" / f"copy{i}.txt").write_text(REPEATED)


def test_validation_drawn_from_train_is_told_to_remove_the_repeated_text(tmp_path):
    """Data with ``train/`` and ``test/`` but no validation split: lowbit draws validation from
    ``train/`` by a hash of the names, so there are no validation files to remove a copy from."""
    _train_and_test(tmp_path / "data", copies_in_test=0)
    (line,) = load_corpus(str(tmp_path / "data")).warnings
    assert "1 of 1 validation documents have the text of a training document" in line
    fix = line.split("fix: ", 1)[1]
    assert (
        fix.startswith("remove the repeated text from the training data") and "as given" not in fix
    )


def test_copies_in_a_named_split_and_drawn_ones_get_both_fixes(tmp_path):
    _train_and_test(tmp_path / "data", copies_in_test=2)
    (line,) = load_corpus(str(tmp_path / "data")).warnings
    assert "1 of 1 validation and 2 of 3 test documents" in line
    fix = line.split("fix: ", 1)[1]
    assert fix.startswith("remove the copies from the test data (kept as given) and ")
    assert "the repeated text from the training data" in fix
