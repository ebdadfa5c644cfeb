"""Session 35: option errors of `lowbit train` and `lowbit compare` that named the problem but no
fix (`--threads 0`, an unknown --optimizer-state, --task, --tokenizer or --strategy, a CNN size
that is a language model's, an overrides setting that is no list)."""

import pytest

from lowbit.cli import main

TRAIN = ["train", "--steps", "1", "--quiet"]
COMPARE = ["compare", "--recipes", "fp32", "--seeds", "1", "--steps", "1", "--quiet"]


@pytest.mark.parametrize(
    ("argv", "fix"),
    [
        ([*COMPARE, "--threads", "0"], "fix: --threads 1, or leave it out for PyTorch's default"),
        ([*TRAIN, "--optimizer-state", "fp7"], "fix: --optimizer-state fp32 (the default)"),
        ([*COMPARE, "--optimizer-state", "fp7"], "fix: --optimizer-state fp32 (the default)"),
        ([*TRAIN, "--task", "translation"], "fix: --task causal-lm, or another of those"),
        ([*TRAIN, "--tokenizer", "wordpiece"], "fix: --tokenizer byte, or bpe"),
        ([*TRAIN, "--nproc", "2", "--strategy", "zero"], "fix: --strategy ddp or fsdp"),
        (
            [*TRAIN, "--task", "image-classification", "--model", "nano"],
            "unknown CNN size 'nano'; valid CNN sizes: tiny, small; fix: --model tiny or small "
            "for image-classification",
        ),
    ],
)
def test_an_option_error_names_its_fix_and_writes_nothing(tmp_path, capsys, argv, fix):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbit: error: ") and len(err.splitlines()) == 1
    assert fix in err
    assert not out.exists()


def test_an_overrides_setting_that_is_no_list_names_its_fix(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("overrides: {lm_head: fp32}\n")
    assert main([*TRAIN, "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "overrides must be a list of PATTERN=WHAT" in err
    assert "fix: e.g. overrides: ['lm_head=fp32'] in the file, or --override lm_head=fp32" in err
