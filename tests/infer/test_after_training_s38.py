"""Session 38: the steps after training as a user walks them: a run killed before its first
checkpoint given to quantize/prune/export, and a tagger given to generate once its data moved."""

import json
import shutil
import subprocess
import sys

from lowbit.cli import main


def test_a_run_killed_before_its_first_checkpoint_is_told_so(lm_run, tmp_path, capsys):
    """quantize, prune and export said "no checkpoint in checkpoints/; fix: train first" of a run
    killed before its first save, where eval and generate say it stopped and how to start it
    again."""
    run = tmp_path / "run"
    shutil.copytree(lm_run, run)
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").mkdir()
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    info.update(status="running", step=0, pid=gone.pid)
    (run / "run.json").write_text(json.dumps(info), encoding="utf-8")
    capsys.readouterr()
    out = tmp_path / "out"
    restart = f"lowbit train --config {run / 'config.yaml'} --out {run}"
    for argv in (["quantize", "--to", "int8"], ["prune", "--sparsity", "0.5"], ["export"]):
        assert main([argv[0], str(run), *argv[1:], "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert f"{run}: the run stopped (killed) before it saved its first checkpoint" in err
        assert err.rstrip().endswith(f"fix: start it again ({restart})"), err
        assert not out.exists()


def test_generate_refuses_a_tagger_whose_data_moved_for_its_task(moved_tagger, capsys):
    """generate built the run's task before it checked the task: a token-classification run (or
    a folder quantized from it) whose CoNLL data had moved was refused with "no such CoNLL file;
    fix: check the data path", a fix that led only to the refusal for its task."""
    capsys.readouterr()
    expected = {
        "tagger": "tagger is a token-classification run",
        "tagger-int8": "tagger-int8 is a folder quantized or pruned from a token-classification run",
    }
    for source, said in expected.items():
        assert main(["generate", source, "--prompt", "x"]) == 2
        assert capsys.readouterr().err == (
            f"lowbit: error: {said}; fix: generate from a causal-lm run\n"
        )


def test_eval_of_a_pruned_folder_does_not_call_it_larger(lm_run, tmp_path, capsys):
    """A pruned folder is stored dense in fp32, as prune says: eval printed its size as
    "(1.00x larger)", its file's header against the checkpoint's tensors, as if pruning grew it."""
    out = tmp_path / "pruned"
    assert main(["prune", str(lm_run), "--pattern", "2:4", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--max-batches", "1"]) == 0
    size = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("size:"))
    assert size.endswith(" MB (stored dense in fp32, zeros included)"), size


def test_an_export_given_as_the_source_is_refused_before_out_is_checked(lm_run, tmp_path, capsys):
    """An export as quantize's, prune's or export's source was refused as such only once the
    --out in the way (here quantize's default, RUN-int8) had been cleared: the user was told to
    remove a folder, then that the source was wrong all along."""
    hf = tmp_path / "hf"
    assert main(["export", str(lm_run), "--out", str(hf)]) == 0
    taken = tmp_path / "taken"
    for out in (tmp_path / "hf-int8", taken):
        out.mkdir()
        (out / "notes.txt").write_text("mine\n")
    capsys.readouterr()
    for argv in (
        ["quantize", str(hf), "--to", "int8"],
        ["prune", str(hf), "--sparsity", "0.5", "--out", str(taken)],
        ["export", str(hf), "--out", str(taken)],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"lowbit: error: {hf}: a Hugging Face folder that lowbit export "), (
            err
        )
        assert err.rstrip().endswith(f"fix: give the folder it was exported from, {lm_run}"), err
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]


def test_a_folder_with_one_scale_per_row_records_no_padding(lm_run, tmp_path):
    """quantization.json of an int8 or fp8 folder said ``"pad_groups": true`` beside
    ``"group_size": null``, though such a folder has no group to pad and --pad-groups is refused
    for it; a folder of groups records what it did."""
    for to, group, pads in (("int8", None, False), ("fp8", None, False), ("int4", 32, True)):
        out = tmp_path / to
        assert main(["quantize", str(lm_run), "--to", to, "--out", str(out)]) == 0
        recipe = json.loads((out / "quantization.json").read_text(encoding="utf-8"))["quantization"]
        assert (recipe["group_size"], recipe["pad_groups"]) == (group, pads), recipe
