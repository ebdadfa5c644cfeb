"""Session 27: an export given where a run belongs names the run it was exported from."""

import pytest

from lowbit.cli import main


@pytest.mark.parametrize(
    ("command", "options"),
    [(["eval"], []), (["generate"], ["--prompt", "def "]), (["train", "--resume"], [])],
)
def test_an_export_given_for_a_run_names_its_run(lm_run, tmp_path, capsys, command, options):
    """`lowbit eval EXPORT` said "evaluate the run it came from" without naming it, though the
    export records it (lowbit_export.json)."""
    export = tmp_path / "hf"
    assert main(["export", str(lm_run), "--out", str(export)]) == 0
    capsys.readouterr()
    assert main([*command, str(export), *options]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"lowbit: error: {export}: a lowbit export of {lm_run} (config.json), not a lowbit run "
        f"folder; fix: give {lm_run}, or train from it with --model {export}"
    )
