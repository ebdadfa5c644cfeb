"""Session 35: `lowbit estimate --model FOLDER --task token-classification` estimated the head with
the config's own labels (2 for a default BertConfig), while `lowbit train` on the built-in task
builds one output per tag of its data (11): the estimate now counts the run's head, and says so."""

from transformers import BertConfig

from lowbit.cli import main
from lowbit.data import LABELS
from lowbit.memory import estimate
from lowbit.models import build_token_classifier

ARGV = ["--task", "token-classification", "--seq", "16"]


def test_a_model_folder_is_estimated_with_the_built_in_tasks_head(tmp_path, capsys):
    folder = tmp_path / "bert"
    config = BertConfig(
        vocab_size=12, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    assert config.num_labels == 2  # a config's own labels, by default
    config.save_pretrained(folder)
    # the model `lowbit train --task token-classification --model FOLDER` trains (no --data)
    trained = build_token_classifier(str(folder), list(LABELS))
    assert trained.num_labels == len(LABELS) == 11
    count = sum(p.numel() for p in trained.parameters())
    assert estimate(str(folder), seq=16, task="token-classification").num_params == count
    assert main(["estimate", "--model", str(folder), *ARGV]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(
        f"model {folder} (token-classification): {count:,} parameters (a head of 11 labels, the "
        "built-in task's);"
    )
