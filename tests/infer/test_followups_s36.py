"""Session 36 follow-ups: a misfitting ``--pattern N:M`` names the patterns that fit, and
``--max-batches 0`` is every batch of a quantized folder, as in `lowbit eval` and `lowbit prune`."""

import re

import pytest
import torch

from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.infer import evaluate_inference_dir, prune_model, quantize_run


def test_a_pattern_that_misfits_names_one_that_fits(lm_run, tmp_path, capsys):
    """2:3 suggested --sparsity alone, as if no N:M pattern fit the model; the one it names now
    prunes."""
    capsys.readouterr()
    assert main(["prune", str(lm_run), "--pattern", "2:3", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: --pattern 2:3 needs in-features divisible by 3, and ")
    assert err.count("\n") == 1 and not (tmp_path / "p").exists()
    fix = err.partition("; fix: ")[2]
    assert fix.startswith("use an M that divides every pruned layer's in-features (2, 4, ")
    suggested = re.search(r"e\.g\. --pattern (\d+:\d+), or --sparsity$", fix.strip())[1]
    assert suggested == "2:4"  # the N given, the smallest M that fits
    argv = ["prune", str(lm_run), "--pattern", suggested, "--out", str(tmp_path / "p")]
    assert main([*argv, "--max-batches", "1"]) == 0


def test_a_model_no_pattern_fits_is_sent_to_sparsity():
    model = torch.nn.Sequential(torch.nn.Linear(7, 6), torch.nn.Linear(6, 3))  # gcd(7, 6) = 1
    with pytest.raises(UsageError, match=r"fix: use --sparsity \(no M of 2 or more divides"):
        prune_model(model, pattern=(2, 4))


def test_max_batches_zero_evaluates_a_folder_whole(digits_run, tmp_path):
    """`lowbit.infer.evaluate_inference_dir(max_batches=0)` was refused, where prune reads 0 as
    every batch: now both, and `lowbit eval`, do."""
    folder = quantize_run(digits_run, "int8", out=tmp_path / "q").out
    whole, _ = evaluate_inference_dir(folder)
    assert evaluate_inference_dir(folder, max_batches=0)[0] == whole
