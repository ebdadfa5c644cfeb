"""`lowbit train` as users run it: flags at their edges, resumed and interrupted runs."""

import json
import time

import pytest
import torch

import lowbit.memory
from lowbit.cli import main
from lowbit.data import tokenizers
from lowbit.errors import UsageError
from lowbit.train import checkpoint as ckpt
from lowbit.train import train

WORDS = ["def", "class", "import", "return", "self", "value", "print", "lambda", "yield", "async"]


def write_corpus(path, documents=200):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(documents):
            text = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(60))
            f.write(json.dumps({"text": text}) + "\n")
    return path


def crash_after(step):
    def crash(trainer):
        if trainer.step_idx == step:
            raise RuntimeError("simulated crash")

    return crash


def test_a_resumed_bpe_run_reads_its_saved_tokenizer(tiny_config, tmp_path, monkeypatch):
    """The tokenizer is the run's, not one trained again on resume (another `tokenizers` version
    could train other ids); a run folder whose tokenizer is damaged or gone is refused."""
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    settings = {
        "steps": 4,
        "eval_interval": 2,
        "recipe": "fp32",
        "data": str(corpus),
        "model": "nano",
    }
    settings |= {"tokenizer": "bpe", "vocab_size": 300}
    straight = train(tiny_config(**settings, out=str(tmp_path / "a")), quiet=True)
    config = tiny_config(**settings, out=str(tmp_path / "b"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, quiet=True, on_step=crash_after(3))

    def no_training(texts, vocab_size):
        raise AssertionError("the resumed run trained a tokenizer")

    monkeypatch.setattr(tokenizers, "train_bpe", no_training)
    resumed = train(config, resume=True, quiet=True)
    assert resumed.train_loss == straight.train_loss
    a = ckpt.load(ckpt.latest(tmp_path / "a"))["model"]
    b = ckpt.load(ckpt.latest(tmp_path / "b"))["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)

    saved = tmp_path / "b" / "tokenizer" / "tokenizer.json"
    saved.write_text("{not json")
    longer = tiny_config(**{**settings, "steps": 6}, out=str(tmp_path / "b"))
    # the run recorded its tokenizer's sha256 (run.json's run_files): the file is named as changed
    with pytest.raises(UsageError, match=r"tokenizer/tokenizer.json changed.*fix: put those back"):
        train(longer, resume=True, quiet=True)
    info = tmp_path / "b" / "run.json"  # a run recorded before session 42: its reader says why
    info.write_text(json.dumps({**json.loads(info.read_text()), "run_files": {}}))
    with pytest.raises(UsageError, match=r"tokenizer is damaged .*fix: restore the run's tok"):
        train(longer, resume=True, quiet=True)
    saved.unlink()
    (saved.parent / tokenizers.CONFIG_NAME).unlink()
    saved.parent.rmdir()
    with pytest.raises(UsageError, match=r"no saved tokenizer .*fix: restore the run's tok"):
        train(longer, resume=True, quiet=True)


def test_throughput_leaves_out_the_memory_report_of_the_second_step(
    tiny_config, tmp_path, monkeypatch
):
    """The second step also measures the run's memory (an extra forward and the estimate): the
    tokens/s of that step and of the run count training time only."""
    measure = lowbit.memory.measure

    def slow_measure(*args, **kwargs):
        time.sleep(1.0)
        return measure(*args, **kwargs)

    monkeypatch.setattr(lowbit.memory, "measure", slow_measure)
    result = train(tiny_config(model="nano", steps=2, recipe="fp32"), quiet=True)
    assert "memory_table" in result.extra  # the report was measured, and its time left out
    assert result.step_time < 0.5
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    train_records = [r for r in map(json.loads, lines) if r["split"] == "train"]
    tokens = 8 * 32  # batch_size x seq_len of tiny_config
    assert [r["step"] for r in train_records] == [1, 2]
    assert all(r["tok_per_s"] > tokens / 0.5 for r in train_records)


def test_a_quantized_folder_is_neither_resumed_nor_overwritten(tiny_config, tmp_path, capsys):
    """A `lowbit quantize` folder holds its source run's config.yaml but no training run: the
    trainer refuses it, even with --overwrite (which would delete its config and tokenizer)."""
    train(tiny_config(model="nano", steps=1, recipe="fp32"), quiet=True)
    run, quantized = tmp_path / "run", tmp_path / "run-int8"
    assert main(["quantize", str(run), "--to", "int8"]) == 0
    before = {p: p.read_bytes() for p in quantized.rglob("*") if p.is_file()}
    for flags in (["--resume", str(quantized)], ["--out", str(quantized), "--overwrite"]):
        capsys.readouterr()
        assert main(["train", "--model", "nano", "--steps", "1", "--quiet", *flags]) == 2
        error = capsys.readouterr().err.strip()
        assert error.endswith("--resume the run it was made from)")
        assert "written by lowbit quantize or prune, not a training run; fix:" in error
        assert "\n" not in error
    assert {p: p.read_bytes() for p in quantized.rglob("*") if p.is_file()} == before


def test_tensorboard_keeps_the_checkpoints_step_after_a_resume(tiny_config, tmp_path):
    """A run resumed from the checkpoint of step 2 shows every step in TensorBoard once, as in
    metrics.jsonl: step 2's records, written before that checkpoint, are not purged with the
    crashed run's later ones."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(model="nano", steps=4, eval_interval=2, recipe="fp32")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, quiet=True, on_step=crash_after(3))
    train(config, resume=True, quiet=True)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = list(map(json.loads, lines))
    for split, metric in (("train", "loss"), ("validation", "loss"), ("train", "lr")):
        logged = [(r["step"], r[metric]) for r in records if r["split"] == split]
        shown = events.Scalars(f"{split}/{metric}")
        assert [e.step for e in shown] == [step for step, _ in logged]
        values = [value for _, value in logged]
        assert [e.value for e in shown] == pytest.approx(values, rel=1e-6)  # stored as float32
    assert [r["step"] for r in records if r["split"] == "validation"] == [0, 2, 4]


@pytest.mark.parametrize("accum", [1, 2])
def test_a_step_averages_over_every_labelled_word_of_its_micro_batches(tiny_config, accum):
    """Token classification: micro-batches with few and with many labelled words weigh by their
    words, as one batch holding both does (a mean of the micro-batches' means weighed a short
    sentence's words more). fp32: the step's loss and gradients are plain PyTorch's."""
    import copy

    import torch.nn.functional as F

    from lowbit.train.tasks import IGNORE_INDEX
    from lowbit.train.trainer import Trainer

    config = tiny_config(
        "token-classification",
        recipe="fp32",
        batch_size=8 // accum,
        grad_accum=accum,
        grad_clip=None,
    )
    trainer = Trainer(config, quiet=True)
    trainer.train_model.eval()  # no dropout: the reference sees the same function
    input_ids, mask, labels = trainer.task.encoded("train")
    words = (labels != IGNORE_INDEX).sum(1)
    rows = torch.cat([words.argsort()[:4], words.argsort()[-4:]])  # the shortest, the longest
    batch = (input_ids[rows], mask[rows], labels[rows])
    micro = [tuple(t[i * 8 // accum : (i + 1) * 8 // accum] for t in batch) for i in range(accum)]
    reference = copy.deepcopy(trainer.train_model)
    logits = reference(input_ids=batch[0], attention_mask=batch[1]).logits
    expected = F.cross_entropy(logits.flatten(0, 1), batch[2].flatten(), ignore_index=IGNORE_INDEX)
    expected.backward()

    trainer.task.train_batches = iter(micro)
    grads = {}
    step = trainer.precision.step

    def keep_gradients(optimizer):
        grads.update({n: p.grad.clone() for n, p in trainer.train_model.named_parameters()})
        return step(optimizer)

    trainer.precision.step = keep_gradients
    out = trainer.step()
    assert out["loss"] == pytest.approx(expected.item(), rel=1e-6)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_tokenizer_without_an_end_of_text_token_is_warned_about(capsys):
    """Its id 0 separates documents and ends samples, though it is a real token."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from lowbit.train.tasks import HFTokenizer

    words = Tokenizer(models.WordLevel(vocab={"!": 0, "a": 1}, unk_token="!"))
    tokenizer = HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=words))
    assert tokenizer.eot_id == 0
    err = capsys.readouterr().err
    assert "no end-of-text token; documents are joined with id 0 ('!')" in err
    assert "fix: set its eos_token" in err
