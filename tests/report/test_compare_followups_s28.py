"""Session 28's follow-ups in `lowbit compare`: how a --jobs study stops when one of its runs fails."""

import json
import textwrap

from lowbit.cli import main

# the digits CNN: how a study stops is the same for every task, and its workers start without
# importing transformers (seconds of CPU each)
FLAGS = ["--task", "image-classification", "--batch-size", "4"]
FLAGS += ["--steps", "4", "--eval-interval", "2", "--save-interval", "1", "--warmup-steps", "1"]
FLAGS += ["--seeds", "1", "--quiet", "--no-plots", "--threads", "1"]

# Imported by the --jobs workers (spawned interpreters with its folder on PYTHONPATH). With
# LOWBIT_TEST_FAIL set, bf16-mixed saves its step-1 checkpoint and waits, in its training loop,
# until fp32's first checkpoint has failed on a full disk and the study has asked it to stop (the
# study's failure event, which the worker reads after each step, is set).
HOOK = textwrap.dedent(
    """
    import errno, os, time
    from pathlib import Path

    if os.environ.get("LOWBIT_TEST_FAIL"):
        import lowbit.train.checkpoint as checkpoint

        save = checkpoint.save

        def held(state, run_dir, step, keep_last):
            runs = Path(run_dir).parents[1]
            if Path(run_dir).parent.name == "fp32":
                for _ in range(600):
                    if (runs / "bf16-saved").exists():
                        break
                    time.sleep(0.1)
                (runs / "fp32-failed").touch()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            path = save(state, run_dir, step, keep_last)
            if step == 1:
                (runs / "bf16-saved").touch()
                from lowbit.report import parallel

                # the failure reaches the study, which stops this run: its event set
                for _ in range(1200):
                    if (runs / "fp32-failed").exists() and parallel._failed():
                        break
                    time.sleep(0.05)
            return path

        checkpoint.save = held
    """
)


def test_a_failed_run_stops_its_siblings_without_saying_interrupted(tmp_path, monkeypatch, capfd):
    """A run failing in a --jobs study stopped the runs training beside it with the stop request
    of a Ctrl-C, and each printed "interrupted: saving a checkpoint after this step (Ctrl-C again
    to abort)" as if the user had pressed Ctrl-C. The error is now the one error line; a sibling
    says where it stopped and that the same command resumes it, which it does."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    monkeypatch.setenv("PYTHONPATH", str(hook))
    monkeypatch.setenv("LOWBIT_TEST_FAIL", "1")
    out = tmp_path / "study"
    argv = ["compare", *FLAGS, "--recipes", "fp32,bf16-mixed", "--jobs", "2", "--out", str(out)]
    assert main(argv) == 1
    captured = capfd.readouterr()
    assert "interrupted" not in captured.err and "Traceback" not in captured.err, captured.err
    (error,) = [line for line in captured.err.splitlines() if line.strip()]
    assert error.startswith(f"lowbit: error: {out}/runs/fp32/seed-0: cannot write the run at")
    assert (
        "stopped: study: fp32 seed 0 failed; study: bf16-mixed seed 0 saved at step 1, resumes "
        "with the same command"
    ) in captured.out.splitlines()
    monkeypatch.delenv("LOWBIT_TEST_FAIL")  # the disk freed: the same command finishes
    assert main(argv) == 0
    record = json.loads((out / "runs" / "bf16-mixed" / "seed-0" / "compare.json").read_text())
    assert record["resumed"] and record["steps"] == 4
