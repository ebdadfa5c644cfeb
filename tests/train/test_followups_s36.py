"""Session 36 follow-ups: `lowbit eval`'s progress in a log, ``--max-batches 0`` as every batch
(as `lowbit prune` reads it), ``--stats-interval 0`` said to be off, and ``run_state`` in
``eval --json`` of a run that did not finish."""

import json
import re

from lowbit.train import trainer as trainer_module
from tests.train.test_run_state_s36 import NANO, killed_run, run_cli  # noqa: F401 (a fixture)


def test_eval_in_a_log_writes_a_progress_line(digits_run, capsys, monkeypatch):
    """stderr a file (a log, CI): the bar was off and a whole split ran minutes without a word
    after the opening note; `lowbit train`'s plain line (at most once a minute, every batch
    here) shows it moving."""
    monkeypatch.setattr(trainer_module._LogProgress, "interval", 0.0)
    code, out, err = run_cli(capsys, "eval", digits_run, "--max-batches", "3")
    assert code == 0 and "accuracy" in out
    batches = re.findall(r"^eval validation: batch (\d)/3, about .* left$", err, re.M)
    assert batches == ["1", "2", "3"]
    assert "\r" not in err


def test_eval_max_batches_zero_is_the_whole_split_as_in_prune(digits_run, capsys):
    """0 was refused by eval (``--max-batches 0: fix: ...``, no problem named) and read as every
    batch by prune: one rule now, and one refusal of a negative count."""
    whole = json.loads(run_cli(capsys, "eval", digits_run, "--json", "--quiet")[1])
    code, out, _ = run_cli(capsys, "eval", digits_run, "--json", "--quiet", "--max-batches", "0")
    assert code == 0 and json.loads(out) == whole
    bounded = json.loads(run_cli(capsys, "eval", digits_run, "--json", "--max-batches", "1")[1])
    assert bounded != whole  # the count still bounds it
    for command in (["eval", digits_run], ["prune", digits_run, "--pattern", "2:4"]):
        code, _, err = run_cli(capsys, *command, "--max-batches", "-1")
        assert code == 2
        assert err == (
            "lowbit: error: --max-batches -1 is negative; fix: use 1 or more, or 0 for every "
            "batch\n"
        )


def test_stats_interval_zero_says_the_statistics_are_off(tmp_path, capsys):
    """It turned them off without a word (--eval-interval 0 is refused; this one turns off, on a
    --resume, the statistics the run logged, so it is taken and said there, and only there: a
    fresh run logs none without the flag either)."""
    argv = ["train", *NANO, "--steps", "1", "--quiet", "--stats-interval"]
    code, _, err = run_cli(capsys, *argv, "0", "--out", tmp_path / "other")
    assert code == 0 and "--stats-interval" not in err
    code, _, err = run_cli(capsys, *argv, "1", "--out", tmp_path / "run")
    assert code == 0
    resume = ["train", "--resume", tmp_path / "run", "--steps", "2", "--quiet"]
    code, _, err = run_cli(capsys, *resume, "--stats-interval", "0")
    assert code == 0
    assert err.strip() == (
        "lowbit: note: --stats-interval 0 stops the numerics statistics this run logged "
        "(--stats-interval 1)"
    )


def _eval_json(capsys, *argv) -> dict:
    code, out, _ = run_cli(capsys, "eval", *argv, "--max-batches", "1", "--json")
    assert code == 0
    return json.loads(out)


def test_eval_json_of_an_unfinished_run_says_its_state(killed_run, capsys):  # noqa: F811
    """The run's state was in the stderr warning alone, which a script reading the JSON line
    never saw."""
    data = _eval_json(capsys, killed_run)
    assert data["run_state"] == "killed" and data["step"] == 4
    info = json.loads((killed_run / "run.json").read_text(encoding="utf-8"))
    info["status"] = "interrupted"
    (killed_run / "run.json").write_text(json.dumps(info), encoding="utf-8")
    assert _eval_json(capsys, killed_run)["run_state"] == "interrupted"
    # a checkpoint given by the user is theirs (no warning), and a finished run has no state
    assert "run_state" not in _eval_json(capsys, killed_run, "--checkpoint", "4")
    info["status"] = "completed"
    (killed_run / "run.json").write_text(json.dumps(info), encoding="utf-8")
    assert "run_state" not in _eval_json(capsys, killed_run)
