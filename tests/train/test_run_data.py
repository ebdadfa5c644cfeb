"""A trained run and its data: eval reads the data again, generate needs none of it."""

import shutil

from lowbit.cli import main


def _text_folder(folder):
    folder.mkdir()
    for i in range(150):  # ~5% of files land in each of validation, test
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


def _conll_folder(folder, sentences=30, words=4):
    folder.mkdir()
    for split in ("train", "dev", "test"):
        lines = []
        for i in range(sentences):
            lines += [f"w{j} {'B-LOC' if j == 0 else 'O'}" for j in range(words + i % 3)] + [""]
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_a_token_classifier_keeps_its_tags_when_the_data_gains_one(tmp_path, capsys, monkeypatch):
    """The run's tags are saved with it (labels.json): evaluation does not renumber them from
    the data, and data with a tag the run never saw is refused with a one-line error."""
    monkeypatch.chdir(tmp_path)
    data = _conll_folder(tmp_path / "conll")
    argv = ["train", "--task", "token-classification", "--data", "conll", "--steps", "2"]
    argv += ["--eval-interval", "2", "--batch-size", "4", "--seq-len", "16", "--quiet"]
    assert main([*argv, "--out", "run"]) == 0
    assert (tmp_path / "run" / "labels.json").is_file()
    with (data / "test.txt").open("a") as test:
        test.write("Zed B-PER\nran O\n\n")
    capsys.readouterr()
    assert main(["eval", "run", "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "tags the run did not train with (B-PER)" in err and "Traceback" not in err


def test_sentences_cut_by_the_sequence_length_are_counted_in_a_warning(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    _conll_folder(tmp_path / "conll", words=20)
    argv = ["train", "--task", "token-classification", "--data", "conll", "--steps", "1"]
    argv += ["--eval-interval", "1", "--batch-size", "4", "--seq-len", "16", "--quiet"]
    assert main([*argv, "--out", "run"]) == 0
    err = capsys.readouterr().err
    assert "30 of 30 train sentences are longer than --seq-len 16 holds" in err


def test_eval_refuses_a_negative_batch_count_and_another_runs_checkpoint(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    _text_folder(tmp_path / "data")
    _conll_folder(tmp_path / "conll")
    base = ["--steps", "1", "--eval-interval", "1", "--batch-size", "2", "--seq-len", "16"]
    assert main(["train", "--data", "data", *base, "--quiet", "--out", "lm"]) == 0
    tagger = ["train", "--task", "token-classification", "--data", "conll", *base, "--quiet"]
    assert main([*tagger, "--out", "tagger"]) == 0
    other = next((tmp_path / "tagger" / "checkpoints").glob("*.pt"))
    for argv, message in (
        (["eval", "lm", "--max-batches", "-1"], "--max-batches -1 is negative; fix: use 1"),
        (["eval", "lm", "--checkpoint", str(other)], "its weights do not fit the model of lm"),
    ):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_a_split_too_short_for_one_window_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for i in range(150):  # ~20 tokens a file: train holds a window of 1001 tokens, validation not
        (tmp_path / "data" / f"f{i:03d}.txt").write_text(f"def f(x): return {i}\n")
    argv = ["train", "--data", "data", "--steps", "1", "--seq-len", "1000", "--quiet"]
    assert main([*argv, "--out", "run"]) == 2
    err = capsys.readouterr().err
    assert "data: the validation split holds" in err and "fewer than one window" in err


def test_eval_from_another_folder_reads_the_data_the_run_read(tmp_path, capsys, monkeypatch):
    """A relative --data names a folder from where the run started: run.json records its
    absolute path, which eval uses from anywhere."""
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    _text_folder(tmp_path / "project" / "data")
    argv = ["train", "--data", "data", "--steps", "1", "--eval-interval", "1", "--quiet"]
    assert main([*argv, "--batch-size", "2", "--seq-len", "16", "--out", "run"]) == 0
    monkeypatch.chdir(tmp_path)
    for path in _text_folder(tmp_path / "data").glob("*.txt"):  # same relative name, other text
        path.write_text("other\n" * 50)
    capsys.readouterr()
    assert main(["eval", "project/run", "--json"]) == 0
    assert '"loss"' in capsys.readouterr().out


def test_a_bad_encoder_folder_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _conll_folder(tmp_path / "conll")
    (tmp_path / "encoder").mkdir()
    (tmp_path / "encoder" / "config.json").write_text('{"hidden_size": 32}')
    argv = ["train", "--task", "token-classification", "--model", "encoder", "--data", "conll"]
    assert main([*argv, "--steps", "1"]) == 2
    assert 'encoder/config.json: no "model_type" field' in capsys.readouterr().err


def test_conll_2003_file_names_are_its_splits(tmp_path):
    from lowbit.train.tasks import conll_splits

    folder = tmp_path / "conll2003"
    folder.mkdir()
    for name, words in (("eng.train", 3), ("eng.testa", 4), ("eng.testb", 5)):
        (folder / name).write_text("-DOCSTART- -X- -X- O\n\n" + "EU NNP B-NP B-ORG\n" * words)
    splits = conll_splits(str(folder))
    assert [len(splits[s][0].tokens) for s in ("train", "validation", "test")] == [3, 4, 5]


def test_the_end_of_run_sample_starts_from_the_users_text(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for i in range(150):
        (tmp_path / "data" / f"f{i:03d}.txt").write_text(f"Dear diary, day {i} was long.\n" * 30)
    argv = ["train", "--data", "data", "--steps", "1", "--eval-interval", "1"]
    assert main([*argv, "--batch-size", "2", "--seq-len", "16", "--out", "run"]) == 0
    printed = capsys.readouterr().out
    assert "sample:\n    Dear diary, day" in printed


def test_an_override_of_no_layer_is_a_warning_in_quiet_runs_too(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--recipe", "fp8-tensorwise", "--override", "nosuchlayer=fp32", "--quiet"]
    argv += ["--steps", "1", "--eval-interval", "1", "--batch-size", "2", "--seq-len", "16"]
    assert main([*argv, "--model", "nano", "--out", "run"]) == 0
    assert "warning: override nosuchlayer=fp32 applies to no layer" in capsys.readouterr().err
