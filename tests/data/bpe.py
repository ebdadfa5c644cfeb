"""Word-piece tokenizers of the families tests need, trained here on a few words (no downloads)."""

# Llama 3's pre-tokenizer pattern (tokenizer.json of Meta-Llama-3-8B; Qwen2's differs in \p{N})
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def llama3_bpe(words: list[str]):
    """Byte-level BPE after Llama 3's regex split, no prefix space (Llama 3's and Qwen2's kind),
    trained on ``words``, with the special tokens ``<|end_of_text|>`` and ``<|pad|>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        special_tokens=["<|end_of_text|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        vocab_size=330,
    )
    bpe.train_from_iterator([" ".join(words) + " " + " ".join(words)] * 20, trainer)
    return bpe
