"""Session 37: ``lowbit train --task token-classification --model RUN`` (a lowbit run folder, or
a path inside one) said "neither a token-classifier size ... nor a Hugging Face model folder";
it now names the run and the ways to train from it that work, as causal-lm's --model does
(`lowbit.models.pretrained.run_as_model`): `lowbit export` of a causal-lm run, --resume of a
tagger run (which `lowbit export` refuses).

Review: a real tagger run (it holds a vocab.json) as a causal LM's --model was read as the
model's tokenizer first, "the tokenizer is damaged"; and the export offered for a causal-lm run
as a tagger's --model then failed for want of a padding token."""

import pytest

from lowbit.cli import main
from lowbit.train.config import TrainConfig, resolve, write
from tests.once import folder_once_per_session
from tests.train.test_run_data import _conll_folder


def _run(folder, **settings):
    """A run folder as `lowbit train` writes it (its config.yaml)."""
    folder.mkdir(parents=True)
    write(resolve(TrainConfig(out=str(folder), **{"model": "nano", **settings})), folder)
    return folder


def _train_error(capsys, model, out) -> str:
    argv = ["train", "--task", "token-classification", "--model", str(model), "--steps", "1"]
    assert main([*argv, "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert not out.exists()
    return lines[0]


@pytest.mark.parametrize("inside", ["", "checkpoints/step-0000004.pt", "config.yaml"])
def test_a_causal_lm_run_as_a_taggers_model_says_to_export_it(tmp_path, capsys, inside):
    run = _run(tmp_path / "R")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step-0000004.pt").write_bytes(b"\x80\x02 a pickled checkpoint")
    line = _train_error(capsys, run / inside if inside else run, tmp_path / "out")
    if inside:
        assert line == (
            f"lowbit: error: {run / inside}: inside the lowbit run folder {run}, not a model; "
            f"fix: lowbit export {run} --out DIR (its last checkpoint) and train with --model DIR"
        )
    else:  # no --resume: it would go on training the causal LM
        assert line == (
            f"lowbit: error: {run}: not a Hugging Face checkpoint folder (no config.json) but a "
            f"lowbit run or quantized/pruned one; fix: lowbit export it (lowbit export {run} "
            "--out DIR) and train with --model DIR"
        )


@pytest.fixture(scope="module")
def tagger_run(tmp_path_factory):
    """A real 1-step token-classification run on the built-in data: its folder holds the word
    vocabulary (vocab.json) that a causal LM's --model folder brings its tokenizer in. Trained
    once per session (read only)."""

    def make(folder):
        run = folder / "T"
        argv = ["train", "--task", "token-classification", "--steps", "1", "--eval-interval", "1"]
        settings = ["--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--quiet"]
        assert main([*argv, *settings, "--out", str(run)]) == 0
        assert (run / "vocab.json").is_file()
        return run

    return folder_once_per_session(tmp_path_factory, "run-as-model-s37", make)


def test_a_tagger_run_as_a_taggers_model_says_to_resume_it(tagger_run, tmp_path, capsys):
    line = _train_error(capsys, tagger_run, tmp_path / "out")
    assert line == (
        f"lowbit: error: {tagger_run}: not a Hugging Face checkpoint folder (no config.json) but a "
        "lowbit run or quantized/pruned one; fix: --resume the run"
    )


NO_MODEL = (
    "fix: give a Hugging Face model folder (a token-classification run is no model to start "
    "from: lowbit export takes causal-lm runs)"
)


def test_a_tagger_run_as_a_causal_lms_model_is_no_model(tagger_run, tmp_path, capsys):
    """Its vocab.json was read as the model's tokenizer first: "the tokenizer is damaged"."""
    out = tmp_path / "out"
    assert main(["train", "--model", str(tagger_run), "--steps", "1", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"lowbit: error: {tagger_run}: not a Hugging Face checkpoint folder (no config.json) but "
        f"a lowbit run or quantized/pruned one; {NO_MODEL}\n"
    )
    assert not out.exists()


@pytest.mark.slow
def test_the_export_of_a_causal_lm_run_trains_a_tagger(tmp_path, capsys):
    """The fix offered for a causal-lm run as a tagger's --model, `lowbit export RUN --out DIR`
    and --model DIR, then failed with "the tokenizer has no padding token": a decoder's tokenizer
    has none (GPT-2's, Llama's). It pads with its end-of-text token, as Hugging Face's users do:
    the attention mask hides those positions and the labels ignore them."""
    lm, hf = tmp_path / "lm", tmp_path / "hf"
    small = ["--steps", "1", "--eval-interval", "1", "--batch-size", "2", "--seq-len", "16"]
    assert main(["train", *small, "--eval-batches", "1", "--quiet", "--out", str(lm)]) == 0
    assert main(["export", str(lm), "--out", str(hf)]) == 0
    # a few CoNLL sentences, shorter than --seq-len (padded): the built-in task tags and encodes
    # a source tree first, most of the test's time, and the padding token is the tokenizer's
    data = _conll_folder(tmp_path / "conll", sentences=4)
    tagger = ["train", "--task", "token-classification", "--model", str(hf), "--data", str(data)]
    tagger += small
    assert main([*tagger, "--eval-batches", "1", "--quiet", "--out", str(tmp_path / "t")]) == 0
    assert main(["eval", str(tmp_path / "t"), "--max-batches", "1"]) == 0
