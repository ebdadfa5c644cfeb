"""Session 36: `lowbit train` and `lowbit compare` refuse an --out where no folder can be made
(/proc/x: the kernel's file system, which even root cannot write) in one line before any set-up;
both ended in a FileNotFoundError traceback when they made the folder."""

from pathlib import Path

import pytest

from lowbit.cli import main

pytestmark = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--model", "nano", "--steps", "2", "--out", "/proc/lowbit-x"],
        ["compare", "--recipes", "fp32", "--task", "image-classification", "--steps", "2",
         "--out", "/proc/lowbit-y/z"],
    ],
    ids=["train", "compare"],
)  # fmt: skip
def test_an_out_where_no_folder_can_be_made_is_one_line(command, capsys):
    assert main(command) == 2
    err = capsys.readouterr().err
    out = command[-1]
    assert err == (
        f"lowbit: error: --out {out}: no folder can be made in /proc (No such file or directory); "
        "fix: choose a folder you may write to\n"
    )
