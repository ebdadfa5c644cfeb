"""`lowbit eval` of a tagger whose sentences outgrow its --seq-len: the truncation warning said
"left out of training and metrics" and "fix: raise --seq-len", a training option, for the train
split too, which eval does not score (session 37)."""

from lowbit.cli import main

LONG = [f"w{i} O" for i in range(20)] + [""]  # 20 words: past --seq-len 12
SHORT = ["Ann B-PER", "Lee I-PER", "ran O", ""]


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if "sentences are longer than" in line]


def test_eval_says_the_metrics_and_a_new_run(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.txt", "dev.txt", "test.txt"):
        (data / name).write_text("\n".join(SHORT * 6 + LONG))
    run = tmp_path / "run"
    argv = ["train", "--task", "token-classification", "--model", "tiny", "--seq-len", "12"]
    argv += ["--batch-size", "4", "--steps", "1", "--data", str(data), "--quiet", "--out", str(run)]
    assert main(argv) == 0
    assert _warnings(capsys.readouterr().err) == [
        "lowbit: warning: 1 of 7 train sentences are longer than --seq-len 12 holds; their words "
        "past it are left out of training; fix: raise --seq-len (up to the encoder's 512)",
        "lowbit: warning: 1 of 7 validation sentences are longer than --seq-len 12 holds; their "
        "words past it are left out of the metrics; fix: raise --seq-len (up to the encoder's "
        "512)",
    ]
    assert main(["eval", str(run), "--split", "test", "--quiet"]) == 0
    assert _warnings(capsys.readouterr().err) == [
        "lowbit: warning: 1 of 7 test sentences are longer than the run's --seq-len 12 holds; "
        "their words past it are left out of the metrics; fix: train a run with a longer "
        "--seq-len (up to the encoder's 512), or split such sentences into shorter ones (a blank line between the parts)"
    ]


def test_a_rank_other_than_the_first_says_no_data_warning(tmp_path, capsys, monkeypatch):
    """Every rank of a distributed run reads the same data: each printed the task's data
    warnings (six lines for three warnings on two ranks); rank 0 alone says them now."""

    def train(rank: str, tag: str) -> str:
        data = tmp_path / rank / "data"
        data.mkdir(parents=True)
        (data / "train.txt").write_text("\n".join(SHORT * 6))
        (data / "dev.txt").write_text("\n".join([f"Rome {tag}", "ran O", ""] + SHORT * 3))
        (data / "test.txt").write_text("\n".join(SHORT * 3))
        argv = ["train", "--task", "token-classification", "--model", "tiny", "--seq-len", "12"]
        argv += ["--batch-size", "4", "--steps", "1", "--data", str(data), "--quiet"]
        monkeypatch.setenv("RANK", rank)  # as torchrun sets it; a run alone still (no WORLD_SIZE)
        assert main([*argv, "--out", str(tmp_path / rank / "run")]) == 0
        return capsys.readouterr().err

    assert "never occurs in training" not in train("1", "B-LOC")
    assert "1 tag of the validation split never occurs in training (B-ORG)" in train("0", "B-ORG")
