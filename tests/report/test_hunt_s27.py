"""Session 27's hunt through `lowbit compare`: a run folder that cannot be written in a --jobs
worker, the device in the report, benchmarks/parity.py continued on another device."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from lowbit.cli import main

LM_FLAGS = ["--model", "nano", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1"]
LM_FLAGS += ["--steps", "2", "--eval-interval", "2", "--warmup-steps", "1", "--seeds", "1"]
# the digits CNN, for the --jobs studies: what is checked is a worker's failure or stop, the same
# for every task, and a worker starts without importing transformers (seconds of CPU each)
JOBS_FLAGS = ["--task", "image-classification", "--batch-size", "4", "--steps", "2"]
JOBS_FLAGS += ["--eval-interval", "2", "--warmup-steps", "1", "--seeds", "1", "--jobs", "2"]
GPU = "NVIDIA H100 80GB HBM3"

# Imported by every interpreter started with its folder on PYTHONPATH: the --jobs workers (spawned,
# fresh interpreters), not the test's own process, which started before. LOWBIT_TEST_DISK is
# "RECIPE,OTHER,HOW": RECIPE's checkpoint waits until the study's other run has finished (its
# worker then waits for a next run, as the stop request reaches it), then meets a full disk
# (HOW "full") or is written once the test has sent its Ctrl-C (HOW "slow": the file
# runs/interrupted, which the test writes after the signal); or its worker is killed at once
# (HOW "kill", as the kernel's out-of-memory killer does).
DISK = textwrap.dedent(
    """
    import errno, os, time
    from pathlib import Path

    if os.environ.get("LOWBIT_TEST_DISK"):
        import lowbit.train.checkpoint as checkpoint

        save = checkpoint.save

        def held(state, run_dir, step, keep_last):
            recipe, other, how = os.environ["LOWBIT_TEST_DISK"].split(",")
            if Path(run_dir).parent.name != recipe:
                return save(state, run_dir, step, keep_last)
            if how == "kill":
                os.kill(os.getpid(), 9)
            record = Path(run_dir).parents[1] / other / "seed-0" / "compare.json"
            for _ in range(600):
                if record.is_file():
                    break
                time.sleep(0.1)
            if how == "full":
                time.sleep(1)  # its worker back in the pool's loop
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            for _ in range(1200):  # "slow": held until the Ctrl-C has been sent
                if (Path(run_dir).parents[1] / "interrupted").exists():
                    break
                time.sleep(0.05)
            return save(state, run_dir, step, keep_last)

        checkpoint.save = held
    """
)


def _hook(tmp_path, monkeypatch, how: str) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(DISK)
    monkeypatch.setenv("PYTHONPATH", str(hook))
    monkeypatch.setenv("LOWBIT_TEST_DISK", f"fp32,bf16-mixed,{how}")


def _compare(out, *flags, task_flags=LM_FLAGS) -> int:
    argv = ["compare", *task_flags, "--quiet", "--no-plots", "--threads", "1", "--out", str(out)]
    return main([*argv, *flags])


def test_a_full_disk_in_a_worker_is_one_line_naming_the_study_fix(tmp_path, monkeypatch, capfd):
    """A run whose folder cannot be written in a --jobs worker reaches the user as the one line
    of `lowbit train` (the run, what is kept), and its fix resumes the study, not `lowbit train`
    on the one run (which finished it outside the study). The other worker, asked to stop, stays
    quiet: a stop request reaching it between runs raised KeyboardInterrupt in its idle loop,
    which printed a traceback."""
    _hook(tmp_path, monkeypatch, "full")
    out = tmp_path / "study"
    assert _compare(out, "--recipes", "fp32,bf16-mixed", task_flags=JOBS_FLAGS) == 1
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    error = err.strip().splitlines()[-1]
    assert error.startswith(f"lowbit: error: {out}/runs/fp32/seed-0: cannot write the run at")
    assert "(No space left on device); no checkpoint was saved" in error
    assert error.endswith(
        f"fix: free disk space, then run the same command again to resume (out {out})"
    )
    monkeypatch.delenv("LOWBIT_TEST_DISK")  # the disk freed: the same command finishes
    assert _compare(out, "--recipes", "fp32,bf16-mixed", task_flags=JOBS_FLAGS) == 0
    assert (out / "runs" / "fp32" / "seed-0" / "compare.json").is_file()


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
def test_a_ctrl_c_that_finds_a_worker_between_runs_prints_no_traceback(tmp_path, monkeypatch):
    """Ctrl-C reaches the whole process group: a worker waiting for its next run (none left)
    died of it with a KeyboardInterrupt traceback under the study's "interrupted" line."""
    _hook(tmp_path, monkeypatch, "slow")
    out = tmp_path / "study"
    argv = ["compare", *JOBS_FLAGS, "--quiet", "--no-plots", "--threads", "1", "--out", str(out)]
    argv += ["--recipes", "fp32,bf16-mixed"]
    code = f"import sys; from lowbit.cli import main; sys.exit(main({argv!r}))"
    parent = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, as a terminal's job is
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "runs" / "bf16-mixed" / "seed-0" / "compare.json").is_file():
            assert parent.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(1)  # fp32 in its checkpoint's wait, bf16-mixed's worker idle
        os.killpg(parent.pid, signal.SIGINT)
        (out / "runs" / "interrupted").touch()  # fp32's checkpoint, held till now, is written
        _, err = parent.communicate(timeout=120)
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
    err = err.decode()
    assert parent.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("lowbit: interrupted; run the same command")


def test_a_worker_killed_for_memory_is_one_line_naming_jobs(tmp_path, monkeypatch, capfd):
    """A --jobs worker killed outright (the out-of-memory killer) broke the process pool, whose
    BrokenProcessPool reached the user as a traceback of concurrent.futures' internals."""
    _hook(tmp_path, monkeypatch, "kill")
    out = tmp_path / "study"
    # the nano Llama, not digits: on digits, bf16-mixed was once named beside fp32 as killed (its
    # worker, it seems, met the pool's SIGTERM before its run could save on it)
    assert _compare(out, "--recipes", "fp32,bf16-mixed", "--jobs", "2") == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    (error,) = [line for line in err.splitlines() if line.startswith("lowbit: error: ")]
    assert "a worker process died while training study: fp32 seed 0, one of 2 runs" in error
    assert error.endswith(
        "fix: a lower --jobs (each worker holds its own model and data), then "
        "run the same command again to resume"
    )


@pytest.fixture(scope="module")
def one_seed(tmp_path_factory):
    out = tmp_path_factory.mktemp("s27") / "study"
    assert _compare(out, "--recipes", "fp32,bf16-mixed") == 0
    return out


def test_the_report_names_the_device_and_threads_of_its_speed_table(one_seed):
    """The runs' records name their device, but report.md, report.html and results.json did not:
    a reader comparing the throughput table with another study's could not tell a CPU's from a
    GPU's, or one thread's from four."""
    results = json.loads((one_seed / "report" / "results.json").read_text())
    assert results["speed_devices"] == ["cpu"]
    for name in ("report.md", "report.html"):
        text = (one_seed / "report" / name).read_text()
        assert "measured on cpu, 1 thread" in text


def test_parity_refusal_of_a_run_of_another_device_names_a_flag_it_has(parity, tmp_path, capsys):
    """parity.py continued on a machine with a GPU refused its CPU runs with "fix: --device cpu
    as before", a flag parity.py did not have (argparse refused it in turn)."""
    argv = ["--tasks", "image-classification", "--recipes", "fp32", "--seeds", "1"]
    argv += ["--img-steps", "1", "--jobs", "1", "--no-write", "--quiet", "--out", str(tmp_path)]
    assert parity.main(argv) == 0  # on the CPU
    capsys.readouterr()
    import lowbit.train.trainer as trainer

    resolve = trainer.resolve_device

    def on_a_gpu_machine(name):
        return torch.device("cuda") if name == "auto" else resolve(name)

    with pytest.MonkeyPatch.context() as patch:  # the same study where a GPU is found
        patch.setattr(trainer, "resolve_device", on_a_gpu_machine)
        patch.setattr(torch.cuda, "get_device_name", lambda device=None: GPU)
        with pytest.raises(SystemExit) as stopped:
            parity.main(argv)
        assert stopped.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"trained on cpu, now cuda ({GPU})" in error and "fix: --device cpu" in error
        assert parity.main([*argv, "--device", "cpu"]) == 0  # the fix it names: reused
    assert "fp32 seed 0: validation loss" in capsys.readouterr().out


def test_parity_reports_a_full_disk_in_one_line(parity, tmp_path, monkeypatch, capsys):
    """benchmarks/parity.py let a run's `RunNotWritten` out as a traceback."""
    import errno

    import lowbit.train.checkpoint as checkpoint

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "save", full)
    argv = ["--tasks", "image-classification", "--recipes", "fp32", "--seeds", "1"]
    argv += ["--img-steps", "1", "--jobs", "1", "--no-write", "--quiet", "--out", str(tmp_path)]
    assert parity.main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("parity: error: ") and "(No space left on device)" in error
    assert error.endswith("fix: free disk space, then run the same command again to resume")


@pytest.mark.parametrize(
    ("seeds", "message"),
    [([], "no seeds given"), ([0, 0], "seed 0 is listed twice; fix: list each seed once")],
)
def test_make_study_refuses_no_seeds_and_a_seed_twice(seeds, message, tmp_path):
    """`make_study(seeds=[])` failed with max()'s ValueError; ``[0, 0]`` trained one run and
    counted it twice, as two seeds that agree exactly: a spread of 0 that made every gap
    significant."""
    from lowbit.errors import UsageError
    from lowbit.report import make_study

    with pytest.raises(UsageError, match=message):
        make_study("fp32,bf16-mixed", {"model": "nano"}, seeds=seeds, out=tmp_path / "s")
    assert not (tmp_path / "s").exists()
