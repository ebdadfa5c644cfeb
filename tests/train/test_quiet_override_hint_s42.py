"""`lowbit train --quiet` and `lowbit estimate` name, of an override that applies to no layer,
what it names instead, as the conversion report printed without --quiet does (docs/recipes.md,
"Per-layer overrides": `model.layers.0.mlp=keep` names a module, `model.layers.0.mlp.*` its
layers)."""

from lowbit.cli import main


def test_a_quiet_runs_warning_of_an_unused_override_names_the_pattern_that_works(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--recipe", "fp8-tensorwise", "--override", "model.layers.0.mlp=keep"]
    argv += ["--quiet", "--steps", "1", "--eval-interval", "1", "--batch-size", "2"]
    assert main([*argv, "--seq-len", "16", "--model", "nano", "--out", "run"]) == 0
    err = capsys.readouterr().err
    assert (
        "warning: override model.layers.0.mlp=keep applies to no layer (model.layers.0.mlp "
        "(LlamaMLP) is no GEMM layer: model.layers.0.mlp.* names its layers)" in err
    )


def test_the_estimates_note_of_an_unused_override_names_the_pattern_that_works(capsys):
    argv = ["estimate", "--model", "nano", "--recipe", "fp8-tensorwise"]
    assert main([*argv, "--override", "model.layers.0.mlp=keep"]) == 0
    assert (
        "note: override model.layers.0.mlp=keep applies to no layer (model.layers.0.mlp "
        "(LlamaMLP) is no GEMM layer: model.layers.0.mlp.* names its layers)"
    ) in capsys.readouterr().out
