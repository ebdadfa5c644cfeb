"""Session 30's `lowbit compare` fixes: finished and unfinished runs of a study whose --model folder
changed since are refused, fingerprints are read afresh by each study of one process, and a --jobs
study says each data warning (and a shared data error) once."""

import json
import os
import random

import pytest

from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.report import compare, make_study
from lowbit.report.compare import parse_targets, run_one
from tests.llama import save_llama

TINY = ["--seq-len", "16", "--batch-size", "4", "--eval-batches", "1", "--steps", "2"]
QUIET = ["--quiet", "--no-plots", "--threads", "1"]


def study_argv(tmp_path, recipes="fp32,bf16-mixed"):
    out = tmp_path / "study"
    return ["compare", "--recipes", recipes, "--seeds", "1", "--model", str(tmp_path / "model"),
            *TINY, *QUIET, "--out", str(out)]  # fmt: skip


def losses(tmp_path) -> dict:
    results = json.loads((tmp_path / "study" / "report" / "results.json").read_text())
    return {name: row["val_loss"][0] for name, row in results["recipes"].items()}


def test_a_finished_run_is_refused_after_its_model_folder_changed(tmp_path, capsys):
    """Weights trained again into the same --model folder: the study reused its finished runs and
    reported the old model's losses as the new one's. Refused now, in one line naming the folder
    and the fix; --overwrite retrains from the folder as it is."""
    save_llama(tmp_path / "model", seed=0)
    argv = study_argv(tmp_path)
    assert main(argv) == 0
    before = losses(tmp_path)
    save_llama(tmp_path / "model", seed=1)  # the same architecture, other weights
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"other contents of the model folder {tmp_path / 'model'}" in err
    assert "model.safetensors changed" in err and "fix: --overwrite" in err
    assert losses(tmp_path) == before  # nothing was overwritten
    assert main([*argv, "--overwrite"]) == 0
    assert losses(tmp_path) != before
    assert main(argv) == 0  # and the retrained runs are reused
    assert capsys.readouterr().out.count("(reused)") == 2


def test_an_edited_model_config_is_a_changed_model(tmp_path, capsys):
    save_llama(tmp_path / "model", seed=0)
    argv = study_argv(tmp_path, recipes="fp32")
    assert main(argv) == 0
    config = tmp_path / "model" / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    capsys.readouterr()
    assert main(argv) == 2
    assert "config.json changed" in capsys.readouterr().err


def test_large_weight_files_are_told_apart_by_size_and_time(tmp_path, capsys, monkeypatch):
    """Weights above `HASHED_MAX_BYTES` are not read (gigabytes, on every invocation): a file
    written again, same size, has another modification time."""
    import lowbit.models.pretrained as pretrained

    monkeypatch.setattr(pretrained, "HASHED_MAX_BYTES", 0)
    save_llama(tmp_path / "model", seed=0)
    argv = study_argv(tmp_path, recipes="fp32")
    assert main(argv) == 0
    weights = tmp_path / "model" / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    capsys.readouterr()
    assert main(argv) == 2
    assert "model.safetensors (same size, modification time only) changed" in (
        capsys.readouterr().err
    )


def test_records_without_a_model_fingerprint_are_still_reused(tmp_path, capsys):
    """Runs recorded before the fingerprint existed cannot tell: reused, as before."""
    save_llama(tmp_path / "model", seed=0)
    argv = study_argv(tmp_path, recipes="fp32")
    assert main(argv) == 0
    path = tmp_path / "study" / "runs" / "fp32" / "seed-0" / "compare.json"
    record = json.loads(path.read_text())
    assert record["model_fingerprint"]["config.json"].startswith("sha256:")
    del record["model_fingerprint"]
    path.write_text(json.dumps(record))
    save_llama(tmp_path / "model", seed=1)
    capsys.readouterr()
    assert main(argv) == 0
    assert "(reused)" in capsys.readouterr().out


def test_an_unfinished_run_is_not_resumed_from_a_changed_model_folder(tmp_path):
    """A run interrupted mid-study continues the weights it loaded: resumed after the folder
    changed, it finished as the old model's run among the new model's."""
    save_llama(tmp_path / "model", seed=0)
    settings = {"model": str(tmp_path / "model"), "seq_len": 16, "batch_size": 4, "steps": 4}
    study = make_study("fp32", {**settings, "eval_batches": 1}, seeds=[0], out=tmp_path / "s")

    def stop(trainer):
        trainer.stop_requested = trainer.step_idx == 2

    with pytest.raises(KeyboardInterrupt):
        run_one(study, "fp32", 0, on_step=stop)
    save_llama(tmp_path / "model", seed=1)
    with pytest.raises(UsageError, match="holds an unfinished run trained from other contents"):
        compare(study, plots=False, log=lambda line: None)


def test_a_second_study_in_one_process_reads_the_data_afresh(tmp_path):
    """The data's fingerprint was cached for the life of the process: a notebook that ran a
    study, edited its data and ran it again was shown the old data's runs."""
    data = tmp_path / "data"
    data.mkdir()
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"]
    rng = random.Random(0)
    for split in ("train", "validation"):
        (data / f"{split}.txt").write_text(" ".join(rng.choice(words) for _ in range(400)))
    settings = {"data": str(data), "seq_len": 16, "batch_size": 4, "steps": 2, "eval_batches": 1}
    study = make_study("fp32", settings, seeds=[0], out=tmp_path / "s")
    compare(study, plots=False, log=lambda line: None)
    assert compare(study, plots=False, log=lambda line: None).reused == [("fp32", 0)]
    (data / "train.txt").write_text("other text " * 200)
    with pytest.raises(UsageError, match="other contents of"):
        compare(study, plots=False, log=lambda line: None)


def split_data(folder, validation_words: int) -> None:
    """A data folder that comes split, and a file it is not read for (a warning)."""
    folder.mkdir()
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"]
    rng = random.Random(0)
    (folder / "train.txt").write_text(" ".join(rng.choice(words) for _ in range(400)))
    if validation_words:
        text = " ".join(rng.choice(words) for _ in range(validation_words))
        (folder / "validation.txt").write_text(text)
    (folder / "notes.rst").write_text("not training text")


def test_jobs_say_each_data_warning_once(tmp_path, capfd):
    """--jobs 2: each worker loads the data and said its warnings again, and the study's process
    once more as it read the finished runs: three copies of one line."""
    split_data(tmp_path / "data", validation_words=200)
    argv = ["compare", "--recipes", "fp32,bf16-mixed", "--seeds", "1", *TINY, *QUIET]
    argv += ["--data", str(tmp_path / "data"), "--jobs", "2", "--out", str(tmp_path / "s")]
    assert main(argv) == 0
    err = capfd.readouterr().err
    assert err.count("lowbit: warning: ") == 1 and "(notes.rst)" in err


def test_jobs_say_an_error_every_run_meets_once(tmp_path, capfd):
    """Data with an empty validation split fails every run: each worker's run failed, and the
    study printed the same error as "failed too" above the error itself."""
    split_data(tmp_path / "data", validation_words=0)
    argv = ["compare", "--recipes", "fp32,bf16-mixed", "--seeds", "1", *TINY, *QUIET]
    argv += ["--data", str(tmp_path / "data"), "--jobs", "2", "--out", str(tmp_path / "s")]
    assert main(argv) == 2
    captured = capfd.readouterr()
    assert "failed too" not in captured.out + captured.err
    assert captured.err.count("the validation split is empty") == 1


def test_baseline_and_targets_may_name_auto_as_recipes_does():
    """--recipes takes auto:fp8 as auto (one recipe), but --baseline auto:fp8 and --target
    auto:fp8=2 were refused as not in --recipes, and a name with spaces around it too."""
    study = make_study(
        "fp32, auto:fp8",
        {"steps": 2},
        seeds=1,
        baseline=" auto:fp8",
        targets=parse_targets(["fp32 =2"]),
        out="unused",
    )
    assert study.recipes == ["fp32", "auto"] and study.baseline == "auto"
    assert study.target("fp32").pct == 2
    study = make_study(
        "fp32,auto:fp8", {"steps": 2}, seeds=1, targets=parse_targets(["auto:fp8=2"]), out="x"
    )
    assert study.target("auto").pct == 2
    with pytest.raises(UsageError, match="--target auto is given twice"):
        parse_targets(["auto:fp8=2", "auto=3"])


def test_a_repeated_multi_line_warning_is_said_once_whole(capsys):
    """A warning said before was left out by its first line alone: its indented lines printed
    again, orphaned (the trainer's 'keeps every GEMM layer' warning has them)."""
    import sys

    from lowbit.report.parallel import warnings_once

    with warnings_once():
        for _ in range(2):
            print("lowbit: warning: the recipe keeps every layer:", file=sys.stderr)
            print("  model.layers.0.q_proj: kept", file=sys.stderr)
            print("progress line", file=sys.stderr)
        print("  an indented line of its own", file=sys.stderr)
    assert capsys.readouterr().err.splitlines() == [
        "lowbit: warning: the recipe keeps every layer:",
        "  model.layers.0.q_proj: kept",
        "progress line",
        "progress line",
        "  an indented line of its own",
    ]
