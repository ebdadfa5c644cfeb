"""`lowbit train --nproc 0` said "nproc must be positive, got 0; fix: raise it": neither the flag
nor how far to raise it (session 37)."""

import pytest

from lowbit.cli import main


@pytest.mark.parametrize("nproc", ["0", "-2"])
def test_a_process_count_below_one_names_the_flag_and_its_bounds(tmp_path, capsys, nproc):
    run = tmp_path / "run"
    assert main(["train", "--model", "nano", "--nproc", nproc, "--out", str(run)]) == 2
    assert capsys.readouterr().err == (
        f"lowbit: error: --nproc must be positive, got {nproc}; fix: --nproc 1 or more (at most "
        "the GPUs, or the CPU cores where there are none)\n"
    )
    assert not run.exists()
