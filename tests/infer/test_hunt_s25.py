"""Session 25's hunt through the inference commands: the fp32 master weights of the 16-bit
recipes."""

import torch
from safetensors.torch import load_file

from lowbit.cli import main
from lowbit.train.checkpoint import latest
from tests.infer.conftest import _train
from tests.infer.test_hunt_s24 import _bin_folder, one_line_error


def _masters_by_name(run):
    """The fp32 master weights of a run's latest checkpoint by parameter name, read from the
    checkpoint as the trainer's AdamW orders its parameters: matrices, then vectors."""
    state = torch.load(latest(run), map_location="cpu", weights_only=False)
    weights = state["model"]
    names = [n for n, t in weights.items() if t.dim() >= 2]
    names += [n for n, t in weights.items() if t.dim() < 2]
    masters = state["precision"]["update"]["masters"]
    assert len(masters) == len(names)
    return {name: masters[index] for index, name in enumerate(names)}, weights


def test_export_and_quantize_of_a_run_with_master_weights_use_the_masters(tmp_path):
    """A bf16-low run's weights are its fp32 master weights (the 16-bit parameters are their
    rounding); export --dtype fp32 wrote the bf16 parameters upcast, and quantize quantized
    those. Now both read the masters from the checkpoint's precision state."""
    settings = {"steps": 2, "seq_len": 16, "batch_size": 2, "eval_batches": 1, "lr": 1e-2}
    run = _train(tmp_path / "run", model="nano", recipe="bf16-low", **settings)
    masters, weights16 = _masters_by_name(run)
    assert any(not torch.equal(masters[n], weights16[n].float()) for n in masters)
    assert main(["export", str(run), "--out", str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert set(exported) == set(masters)
    for name, master in masters.items():
        assert torch.equal(exported[name], master), name
    assert main(["export", str(run), "--out", str(tmp_path / "hf16"), "--dtype", "bf16"]) == 0
    exported16 = load_file(tmp_path / "hf16" / "model.safetensors")
    for name, weight16 in weights16.items():  # the masters' rounding: the run's 16-bit weights
        assert torch.equal(exported16[name], weight16), name
    assert main(["quantize", str(run), "--to", "int8", "--out", str(tmp_path / "q")]) == 0
    stored = load_file(tmp_path / "q" / "model.safetensors")
    for name in [n for n in masters if n.endswith("proj.weight")]:
        layer, master = name.removesuffix(".weight"), masters[name]
        scale = master.abs().amax(dim=1, keepdim=True) / 127
        codes = torch.round(master / scale).clamp(-127, 127).to(torch.int8)
        assert torch.equal(stored[f"{layer}.qweight"], codes), name
        assert torch.equal(stored[f"{layer}.scale"].reshape(-1), scale.reshape(-1)), name


def test_a_truncated_legacy_pytorch_model_bin_is_one_line_naming_it(tmp_path, capsys):
    """A pytorch_model.bin of torch's legacy (pickle) format cut short gave torch's traceback
    "RuntimeError: unexpected EOF" in train --model, and in quantize, export, eval and generate
    of a run trained from that folder; now one line names the file and the fix."""
    folder = _bin_folder(tmp_path / "legacy", legacy=True)
    run = tmp_path / "run"
    settings = ["--steps", "1", "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1"]
    assert main(["train", "--model", str(folder), "--out", str(run), *settings]) == 0
    weights = folder / "pytorch_model.bin"
    with open(weights, "r+b") as file:
        file.truncate(weights.stat().st_size - 100)
    capsys.readouterr()
    for command in (
        ["train", "--model", str(folder), "--out", str(tmp_path / "r2"), *settings],
        ["quantize", str(run), "--to", "int8"],
        ["export", str(run), "--out", str(tmp_path / "hf")],
        ["eval", str(run)],
        ["generate", str(run), "--max-new-tokens", "2"],
    ):
        assert main(command) == 2, command
        one_line_error(capsys, f"{weights}: unreadable weights (unexpected EOF")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["legacy", "run"]


def test_export_of_a_mixture_of_experts_run_pairs_each_master_with_its_parameter(tmp_path):
    """The masters are keyed by their place in the trainer's optimizer, which it builds on the
    converted model, where a mixture-of-experts layer registers gpt-oss's expert biases after its
    expert matrices: read in the unconverted model's order, the masters were refused ("do not
    fit") or, where two swapped places have one shape, given to each other's parameters."""
    import transformers

    config = transformers.GptOssConfig(
        vocab_size=257, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=2,
        num_experts_per_tok=1, layer_types=["full_attention"],
        architectures=["GptOssForCausalLM"],
    )  # fmt: skip
    config.save_pretrained(tmp_path / "gpt-oss")
    settings = {"steps": 2, "seq_len": 16, "batch_size": 2, "eval_batches": 1, "lr": 1e-2}
    run = _train(tmp_path / "run", model=str(tmp_path / "gpt-oss"), recipe="fp16-low", **settings)
    _, weights16 = _masters_by_name(run)
    assert main(["export", str(run), "--out", str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    for name, weight16 in weights16.items():  # each master rounds to its own parameter
        assert torch.equal(exported[name].to(weight16.dtype), weight16), name
