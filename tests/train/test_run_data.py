"""A trained run and its data: eval reads the data again, generate needs none of it."""

import shutil

from lowbit.cli import main


def _text_folder(folder):
    folder.mkdir()
    for i in range(150):
        (folder / f"f{i:02d}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * 20)
    return folder


def test_eval_refuses_changed_data_and_generate_needs_none(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = _text_folder(tmp_path / "data")
    argv = ["train", "--data", "data", "--steps", "2", "--eval-interval", "2", "--quiet"]
    assert main([*argv, "--batch-size", "2", "--seq-len", "32", "--out", "run"]) == 0
    assert main(["eval", "run"]) == 0
    for path in sorted(data.glob("*.txt"))[:60]:  # the same path, other contents
        path.write_text("changed\n" * 40)
    capsys.readouterr()
    assert main(["eval", "run"]) == 2
    assert "other contents than the run trained on" in capsys.readouterr().err
    shutil.rmtree(data)
    assert main(["generate", "run", "--max-new-tokens", "5"]) == 0  # the tokenizer is the run's
