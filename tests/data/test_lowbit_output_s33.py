"""A `lowbit compare` folder and `lowbit doctor`'s output inside the data are left out of a folder
or glob, with a warning (session 33): a compare report.md was read as training text, and a glob
read the study's settings, report and records, and doctor.json."""

import json
import random

from lowbit.data import load_corpus
from lowbit.diagnostics.doctor import Diagnosis, write_outputs
from lowbit.report.compare import make_study

WORDS = ("the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "over", "hills", "and")


def data_with_lowbit_outputs(tmp_path):
    """40 documents, a compare study (settings, report, one run's records) in ``cmp/`` and a
    doctor's output in ``notes/`` beside a file of the user's."""
    data = tmp_path / "data"
    data.mkdir()
    rng = random.Random(0)
    for i in range(40):
        (data / f"doc{i:03d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(120)))
    study = data / "cmp"
    (study / "report").mkdir(parents=True)
    settings = make_study(["fp32", "bf16-mixed"], seeds=1).settings()
    (study / "compare.json").write_text(json.dumps(settings, indent=1) + "\n")  # as compare does
    (study / "report" / "report.md").write_text("# lowbit compare\n\n| recipe | loss |\n")
    (study / "report" / "results.json").write_text(json.dumps({"settings": settings}, indent=1))
    write_outputs(Diagnosis("fp8-tensorwise", 2, []), data / "notes")
    (data / "notes" / "mine.txt").write_text("the cat sat on the mat while dogs ran\n")
    return data


def test_a_compare_folder_and_doctor_output_in_the_data_are_left_out(tmp_path):
    data = data_with_lowbit_outputs(tmp_path)
    for spec in (str(data), f"{data}/**/*"):
        corpus = load_corpus(spec)
        names = {d.name for split in corpus.splits.values() for d in split}
        assert names == {*(f"doc{i:03d}.txt" for i in range(40)), "notes/mine.txt"}, spec
        (line,) = [w for w in corpus.warnings if "left out" in w]
        assert line == (
            f"{spec}: left out cmp/, a lowbit compare folder; the lowbit doctor output in notes/ "
            "(doctor.json, doctor.png): what lowbit writes is no data (and read, it would change "
            "as a run writes); fix: none needed, or keep --out outside the data"
        )


def test_a_users_json_files_of_those_names_are_read(tmp_path):
    """The names alone tell nothing: a compare.json or doctor.json of the user's is data."""
    data = tmp_path / "data"
    data.mkdir()
    rng = random.Random(1)
    (data / "sub").mkdir(parents=True)
    for name in ("compare.json", "doctor.json"):
        lines = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(30))})]
        (data / "sub" / name).write_text("\n".join(lines * 20) + "\n")
    corpus = load_corpus(f"{data}/**/*.json")
    assert not [w for w in corpus.warnings if "left out" in w]
    assert sum(len(split) for split in corpus.splits.values()) == 40
