"""The causal-LM workflow chained as users run it: train -> quantize/prune -> export -> train the
export again, each step reading what the one before wrote."""

import json
import shutil
from pathlib import Path

import torch

from lowbit.cli import main
from lowbit.infer import export_hf, prune_run, quantize_run
from lowbit.train import checkpoint
from tests.infer.conftest import _train


def _checkpoint_dtypes(run) -> set:
    state = checkpoint.load(checkpoint.latest(run))["model"]
    return {tensor.dtype for tensor in state.values() if tensor.is_floating_point()}


def _llama_config(folder: Path, **fields) -> Path:
    """A folder holding only the config.json of a one-block Llama on byte ids."""
    folder.mkdir(parents=True)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "vocab_size": 257,
        "max_position_embeddings": 64,
        **fields,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_config_naming_bfloat16_still_trains_fp32_weights_in_the_fp32_recipe(tmp_path):
    """Published config.json files say "torch_dtype": "bfloat16"; transformers builds the model in
    that dtype, and the fp32 recipe then trained bf16 weights (half the parameter bytes)."""
    folder = _llama_config(tmp_path / "llama", torch_dtype="bfloat16")
    run = _train(tmp_path / "run", model=str(folder), recipe="fp32", steps=1, seq_len=16)
    assert _checkpoint_dtypes(run) == {torch.float32}


def test_fine_tuning_a_bf16_export_starts_from_its_weights_in_fp32(lm_run, tmp_path):
    export_hf(lm_run, tmp_path / "hf", dtype="bf16")
    run = _train(tmp_path / "ft", model=str(tmp_path / "hf"), recipe="fp32", steps=1, seq_len=16)
    assert _checkpoint_dtypes(run) == {torch.float32}


def test_eval_names_the_source_checkpoint_a_longer_run_removed(lm_run, tmp_path, capsys):
    """A run resumed after quantizing keeps only its last checkpoints: the run is still there,
    the checkpoint quantized is not, and eval said the source run was gone."""
    run = shutil.copytree(lm_run, tmp_path / "run")
    quant = quantize_run(run, "int8", out=tmp_path / "q").out
    quantized_from = checkpoint.latest(run)
    quantized_from.unlink()
    capsys.readouterr()
    assert main(["eval", str(quant), "--max-batches", "1"]) == 0
    text = capsys.readouterr().out
    assert f"the source checkpoint {quantized_from} is gone" in text
    assert "is not there" not in text


def test_training_from_a_quantized_folder_says_to_export_it_first(lm_run, tmp_path, capsys):
    quant = quantize_run(lm_run, "int4", out=tmp_path / "q").out
    capsys.readouterr()
    argv = ["train", "--model", str(quant), "--steps", "1", "--out", str(tmp_path / "ft")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and f"fix: lowbit export it (lowbit export {quant} --out DIR)" in err
    )


def test_a_quantized_pruned_folder_reads_the_runs_data_from_another_folder(
    tmp_path, monkeypatch, capsys
):
    """A quantized folder made from a pruned one has the pruned folder as its source, which
    records no data path: its relative --data path was read from the current folder (none there),
    and changed data went unnoticed. Both come from the training run at the start of the chain."""
    data = tmp_path / "my data" / "corpus.txt"
    data.parent.mkdir()
    data.write_text("".join(f"paragraph {i}: the cat sat on the mat.\n\n" for i in range(300)))
    monkeypatch.chdir(tmp_path)
    run = _train(Path("run"), model="nano", data="my data/corpus.txt", steps=1, seq_len=16)
    pruned = prune_run(run, pattern="2:4", out=tmp_path / "pruned").out
    quant = quantize_run(pruned, "int8", out=tmp_path / "quant").out
    monkeypatch.chdir(data.parent)
    capsys.readouterr()
    assert main(["eval", str(quant), "--max-batches", "1"]) == 0
    assert "reference: the source model" in capsys.readouterr().out
    data.write_text("".join(f"paragraph {i}: other text.\n\n" for i in range(300)))
    assert main(["eval", str(quant), "--max-batches", "1"]) == 2
    assert "holds other contents than the run trained on" in capsys.readouterr().err


def test_generate_keeps_the_space_a_sentencepiece_token_begins_with():
    """Llama's tokenizer marks a word's leading space with "▁", which decoding drops at the start
    of a text: the continuation decoded by itself read "helloworld"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import lowbit
    from lowbit.train import sample_text
    from lowbit.train.tasks import HFTokenizer

    vocab = {"▁world": 0, "▁hello": 1, "</s>": 2, "<unk>": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tokenizer = HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>"))
    shape = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}
    model = LlamaForCausalLM(LlamaConfig(**shape, intermediate_size=16, vocab_size=4))
    torch.nn.init.zeros_(model.model.norm.weight)  # every logit 0: greedy picks id 0, "▁world"
    precision = lowbit.Precision("fp32")
    text = sample_text(model, tokenizer, precision, "hello", 2, temperature=0)
    assert text == "hello world world"


def test_a_run_of_a_relative_model_folder_evaluates_and_resumes_from_elsewhere(
    tmp_path, monkeypatch, capsys
):
    """`--model cfg` names a folder from where the run started; eval, generate and --resume from
    another folder read the model the run recorded (as a relative --data path is)."""
    _llama_config(tmp_path / "my models" / "llama")
    monkeypatch.chdir(tmp_path)
    _train(Path("run"), model="my models/llama", steps=1, seq_len=16)
    monkeypatch.chdir(tmp_path / "my models")
    run = str(tmp_path / "run")
    assert main(["eval", run, "--max-batches", "1"]) == 0
    assert main(["generate", run, "--max-new-tokens", "2"]) == 0
    assert main(["train", "--resume", run, "--steps", "2", "--quiet"]) == 0
    assert "2 steps (completed)" in capsys.readouterr().out


def test_doctor_of_a_quantized_folder_names_the_run_to_probe(lm_run, tmp_path, capsys):
    """It said "no checkpoint to probe; fix: train first" after building a trainer."""
    quantized = quantize_run(lm_run, "int8", out=tmp_path / "q").out
    capsys.readouterr()
    assert main(["doctor", "--checkpoint", str(quantized), "--out", str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"lowbit: error: {quantized}: a quantized or pruned model, which holds no training state "
        f"to probe; fix: --checkpoint {lm_run} (the run it was made from)"
    )


def test_a_model_folder_that_is_gone_is_named_so(tmp_path, capsys):
    """A run fine-tuned from a folder since moved was told to "give a named size"."""
    gone = tmp_path / "my models" / "llama"
    argv = ["train", "--model", str(gone), "--steps", "1", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "nor a size (nothing is at that path; a run trained from a folder needs it" in (
        capsys.readouterr().err
    )
    exported = tmp_path / "an export"
    (exported).mkdir()
    (exported / "config.json").write_text("{}")
    assert main(["eval", str(exported)]) == 2
    assert f"--model '{exported}'" in capsys.readouterr().err
