"""--config files in another encoding than UTF-8, or malformed: where, and how to fix (session 36)."""

import pytest

from lowbit.cli import main


def config_error(capsys, tmp_path, *argv) -> str:
    code = main(["train", *map(str, argv), "--out", str(tmp_path / "run"), "--quiet"])
    _, err = capsys.readouterr()
    assert code == 2
    assert not (tmp_path / "run").exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


def test_a_latin1_config_names_the_byte_its_line_and_the_iconv_that_converts_it(tmp_path, capsys):
    """It said "not UTF-8 text (byte 31); fix: save it in UTF-8": neither the line nor how, where
    --data's reader says both."""
    path = tmp_path / "run.yaml"
    path.write_bytes(b"steps: 3\nrecipe: bf16-mixed # caf\xe9\n")
    assert config_error(capsys, tmp_path, "--config", path) == (
        f"lowbit: error: {path}: not UTF-8 text (byte 0xe9 at offset 33, line 2); fix: convert "
        "it from the encoding it was written in, cp1252 (Windows' Latin-1) if 'é' belongs there "
        f"(a guess): iconv -f CP1252 -t UTF-8 {path} > {tmp_path / 'run.utf8.yaml'}, and use "
        "that file in its place"
    )


def test_a_utf16_config_is_told_by_its_byte_order_mark(tmp_path, capsys):
    """PowerShell's `>` and Notepad's "Unicode" write UTF-16 with a byte order mark."""
    path = tmp_path / "run.json"
    path.write_bytes('{"steps": 3}'.encode("utf-16"))
    assert config_error(capsys, tmp_path, "--config", path) == (
        f"lowbit: error: {path}: UTF-16LE text, not UTF-8; fix: convert it to UTF-8: "
        f"iconv -f UTF-16 -t UTF-8 {path} > {tmp_path / 'run.utf8.json'}, and use that file in "
        "its place"
    )


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("run.json", '{"steps": 3,\n  "recipe": bf16}\n', "line 2, column 13: Expecting value"),
        ("run.yaml", "steps: 3\nlr: 1e-3: x\n", "line 2, column 9: mapping values"),
    ],
)
def test_a_syntax_error_names_its_line_and_column(tmp_path, capsys, name, text, where):
    """JSON and YAML errors named the line only (TOML's name both)."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    error = config_error(capsys, tmp_path, "--config", path)
    assert error.startswith(f"lowbit: error: {path}: malformed config ({where}")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("recipe: fp7\n", "unknown recipe 'fp7'"),
        ("eval_interval: 0\n", "eval_interval must be positive, got 0"),
        ("lr: 0.1\nmin_lr: 1\n", "min_lr 1.0 is above lr 0.1"),
    ],
)
def test_a_value_the_file_gave_is_refused_naming_the_file(tmp_path, capsys, text, problem):
    """The error named the setting only, and its fix a flag the user never gave."""
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    assert config_error(capsys, tmp_path, "--config", path).startswith(
        f"lowbit: error: {path}: {problem}"
    )
    # a flag's own bad value beside a good file is the flag's
    path.write_text("steps: 2\n", encoding="utf-8")
    flag = config_error(capsys, tmp_path, "--config", path, "--lr", "-1")
    assert flag.startswith("lowbit: error: lr must be a finite number of at least 0")


@pytest.mark.parametrize(
    "command, key, flag",
    [
        (["train", "--model", "nano", "--steps", "2"], "overwrite", "lowbit train"),
        (
            ["compare", "--recipes", "fp32", "--task", "image-classification"],
            "seeds",
            "lowbit compare",
        ),
        (["doctor", "--model", "nano"], "probe_steps", "lowbit doctor"),
    ],
    ids=["train", "compare", "doctor"],
)
def test_a_command_flag_in_a_config_file_is_named_as_the_flag(command, key, flag, tmp_path, capsys):
    # read as an unknown setting, its fix was a setting spelt alike ('overrides', 'recipe',
    # 'steps'), which changed the run instead
    config = tmp_path / "settings.yaml"
    config.write_text(f"{key}: 2\n", encoding="utf-8")
    assert main([*command, "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    dashed = "--" + key.replace("_", "-")
    assert capsys.readouterr().err == (
        f"lowbit: error: {config}: {key!r} is a {flag} flag, not a setting of the run the file "
        f"describes; fix: give {dashed} on the command line, not in the file\n"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["run", "command"])
def test_the_parsers_own_entries_are_unknown_settings_not_flags(key, tmp_path, capsys):
    # argparse's Namespace holds them too, and they were named as flags --run, --command
    config = tmp_path / "settings.yaml"
    config.write_text(f"{key}: 1\n", encoding="utf-8")
    assert main(["train", "--model", "nano", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"unknown setting {key!r}" in err and "flag" not in err
