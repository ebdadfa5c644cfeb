"""Session 25's second hunt through `lowbit doctor`: the probe of a run killed after its last
checkpoint."""

import json

from lowbit.cli import main

FLAGS = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]


def test_doctor_of_a_run_killed_after_its_checkpoint_reads_its_history_up_to_it(tmp_path, capsys):
    """A run killed after its checkpoint of step 2 had logged the statistics of steps 3 to 8,
    where its inputs' outliers grew; the probe continues from step 2. Those steps were read as
    history between the checkpoint's and the probe's, out of time order: the probe's step 3 came
    after the run's step 8, and the outliers the run had before it was killed were reported as
    growing in the probe that never saw them."""
    run = tmp_path / "run"
    argv = ["train", *FLAGS, "--recipe", "fp8-tensorwise", "--steps", "2", "--stats-interval", "1"]
    assert main([*argv, "--quiet", "--out", str(run)]) == 0
    metrics = run / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    last = next(row for row in reversed(rows) if row["split"] == "stats")
    with metrics.open("a") as file:  # steps 3-8 as the killed run logged them, outliers x1000
        for step in range(3, 9):
            grown = {k: v * 1000 if k.endswith("/amax") else v for k, v in last.items()}
            file.write(json.dumps({**grown, "step": step}) + "\n")
    argv = [
        "doctor",
        "--checkpoint",
        str(run),
        "--probe-steps",
        "1",
        "--out",
        str(tmp_path / "doc"),
    ]
    assert main(argv) == 0
    capsys.readouterr()
    flags = json.loads((tmp_path / "doc" / "doctor.json").read_text())["flags"]
    assert "activation-outliers-growing" not in [flag["pattern"] for flag in flags]
