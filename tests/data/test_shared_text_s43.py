"""The warning of validation text that is also training text (tests/data/test_data_hunt_s29.py)
names a fix the user can make: for one file that lowbit split by paragraph, removing its repeated
paragraphs, not "the copies from the validation and test data (the splits are kept as given)",
data that file does not have (session 43, the README tour's docs on `--data docs.txt`)."""

from lowbit.data.corpus import load_corpus

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
