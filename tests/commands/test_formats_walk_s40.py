"""`lowbit formats --tensor` walked as a user (session 40): its SQNR must be what training sees.

Before: a transformers ``Conv1D`` weight (GPT-2's projections, stored in x out) was quantized
along its last axis, out, while its converted layer (`LowbitConv1D`) quantizes its transpose
along in: a GPT-2 ``c_attn`` weight with one input feature 30x the others read 31.60 dB under
fp8_e4m3/axis (43.22 as trained) and 43.44 under int8/axis (35.13 as trained).
"""

import json

import numpy as np
import pytest
import torch

from lowbit.cli import main
from lowbit.formats import quantize
from lowbit.formats.error import sqnr

AXIS_COLUMNS = {"fp8_e4m3/axis": 3, "int8/axis": 11}  # cells after the name


def rows(out: str) -> dict[str, list[str]]:
    """The SQNR table's cells by tensor name (its title and header are the first two lines)."""
    lines = [line.split() for line in out.splitlines()[2:] if not line.startswith("note:")]
    return {line[0]: line[1:] for line in lines}


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A one-layer GPT-2 saved with save_pretrained, its c_attn weight with an outlier input
    feature (row 5 of in x out), and that weight."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=1, n_embd=64, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    weight = model.transformer.h[0].attn.c_attn.weight
    with torch.no_grad():
        weight[5] *= 30
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(folder)
    return folder, weight.detach().clone()


@pytest.mark.parametrize("given", ["folder", "file"])
def test_conv1d_weights_are_measured_as_their_gemm_reads_them(gpt2_folder, given, capsys):
    folder, weight = gpt2_folder
    path = folder if given == "folder" else folder / "model.safetensors"  # config.json beside
    assert main(["formats", "--tensor", str(path)]) == 0
    out = capsys.readouterr().out
    cells = rows(out)["transformer.h.0.attn.c_attn.weight"]
    for label, column in AXIS_COLUMNS.items():
        fmt, granularity = label.split("/")
        trained = quantize(weight.t(), fmt, granularity).dequantize()  # LowbitConv1D's operand
        assert cells[column] == f"{sqnr(weight.t(), trained):.2f}", label
    note = next(line for line in out.splitlines() if "Conv1D" in line)
    assert "transformer.h.0.mlp.c_fc.weight" in note and "along in" in note
    assert "transformer.h.0.ln_1.weight" not in note and "wte" not in note


def test_numpy_files_and_arrays_are_measured(tmp_path, capsys):
    """A .npy/.npz file was refused ("not a file torch.save wrote"), and a numpy array saved in a
    .pt file read as "holds no floating-point tensor", naming nothing it held."""
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    fp4_mx = f"{sqnr(x, quantize(x, 'fp4_e2m1', 'mx').dequantize()):.2f}"
    np.save(tmp_path / "x.npy", x.numpy())
    np.savez(tmp_path / "x.npz", w=x.numpy(), steps=np.arange(3))
    torch.save({"w": x.numpy()}, tmp_path / "x.pt")
    for name, row in [("x.npy", "tensor"), ("x.npz", "w"), ("x.pt", "w")]:
        assert main(["formats", "--tensor", str(tmp_path / name)]) == 0, name
        table = rows(capsys.readouterr().out)
        assert list(table) == [row] and table[row][9] == fp4_mx, name  # fp4_e2m1/mx


def test_a_numpy_file_of_objects_is_refused_in_one_line(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert main(["formats", "--tensor", str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read it as a numpy file" in err and "fix:" in err


def test_a_file_of_complex_tensors_names_the_fix_for_complex_values(tmp_path, capsys):
    """Its fix was that of an integer tensor, "save x.float()", which drops the imaginary part."""
    torch.save({"w": torch.randn(4, 4, dtype=torch.complex64)}, tmp_path / "c.pt")
    assert main(["formats", "--tensor", str(tmp_path / "c.pt")]) == 2
    err = capsys.readouterr().err
    assert "complex64" in err and "x.real and x.imag" in err and "x.float()" not in err


def test_format_names_choose_the_rows_and_the_columns(tmp_path, capsys):
    """``lowbit formats fp8_e4m3`` (as ``lowbit recipes nvfp4`` names recipes) was refused as
    "unrecognized arguments"."""
    assert main(["formats", "fp4_e2m1", "int4"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table[2:4]] == ["fp4_e2m1", "int4"]
    assert table[4] == "int4: symmetric, -7..7 (the most negative code is unused)"
    assert len(table) == 5
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    torch.save({"w": x}, tmp_path / "x.pt")
    assert main(["formats", "fp4_e2m1", "--tensor", str(tmp_path / "x.pt")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["tensor", "fp4_e2m1/mx", "fp4_e2m1/nvfp4"]
    assert out[2].split()[1] == f"{sqnr(x, quantize(x, 'fp4_e2m1', 'mx').dequantize()):.2f}"


@pytest.mark.parametrize(
    "argv, problem",
    [
        (["fp8"], "unknown number format 'fp8'"),
        (["fp32", "--tensor", "x.pt"], "--tensor measures no scheme of fp32"),
    ],
)
def test_a_format_name_it_cannot_use_is_refused_in_one_line(argv, problem, capsys):
    assert main(["formats", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and problem in err and "fp8_e4m3" in err


@pytest.mark.parametrize("given", ["folder", "file"])
def test_a_quantized_folder_is_refused_naming_its_run(tmp_path, given, capsys):
    """A `lowbit quantize` output's weights are codes (int8) beside fp32 scales: the table
    skipped the codes and measured the scales as weights (rows ``lm_head.scale`` ...), and went
    on doing so for its .safetensors file once the folder was refused."""
    from safetensors.torch import save_file

    folder = tmp_path / "q"
    folder.mkdir()
    codes = torch.randint(-127, 128, (16, 32), dtype=torch.int8)
    save_file(
        {"lm_head.weight": codes, "lm_head.scale": torch.rand(16, 1)}, folder / "w.safetensors"
    )
    manifest = {"quantization": {"format": "int8"}, "source": {"path": "runs/my run"}}
    (folder / "quantization.json").write_text(json.dumps(manifest))
    path = folder if given == "folder" else folder / "w.safetensors"
    assert main(["formats", "--tensor", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: " in err and "int8 codes" in err
    assert "fix: measure the run it came from (lowbit formats --tensor 'runs/my run')" in err


def test_a_run_of_a_relative_model_folder_is_measured_as_trained_from_any_folder(
    gpt2_folder, tmp_path, monkeypatch, capsys
):
    """config.yaml keeps --model as typed, a path relative to where the run started: from another
    folder it named nothing, and the Conv1D weights were measured along out without a word.
    run.json's absolute ``model_path`` names the folder from anywhere."""
    from safetensors.torch import load_file

    from lowbit.train.checkpoint import path_for
    from lowbit.train.config import TrainConfig, write

    folder, weight = gpt2_folder
    run = tmp_path / "run"
    run.mkdir()
    write(TrainConfig(task="causal-lm", model=folder.name), run)  # started in folder.parent
    (run / "run.json").write_text(json.dumps({"model_path": str(folder)}))
    path_for(run, 2).parent.mkdir()
    torch.save({"step": 2, "model": load_file(folder / "model.safetensors")}, path_for(run, 2))
    monkeypatch.chdir(tmp_path)  # where folder.name names nothing
    assert main(["formats", "--tensor", str(run)]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.0.attn.c_attn.weight" in next(
        line for line in out.splitlines() if "Conv1D" in line
    )
    trained = quantize(weight.t(), "int8", "axis").dequantize()
    assert rows(out)["transformer.h.0.attn.c_attn.weight"][AXIS_COLUMNS["int8/axis"]] == (
        f"{sqnr(weight.t(), trained):.2f}"
    )


def test_a_config_that_cannot_be_built_is_noted(tmp_path, capsys):
    """Its Conv1D weights, if any, were measured as stored (along out), without a word."""
    pytest.importorskip("transformers")
    config = {"model_type": "gpt2", "n_embd": 10, "n_head": 3, "n_layer": 1}  # 10 / 3 heads
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save({"w": torch.randn(4, 8)}, tmp_path / "w.pt")
    assert main(["formats", "fp8_e4m3", "--tensor", str(tmp_path / "w.pt")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lowbit formats: note: Conv1D weights")
    assert "measured as stored" in err and "cannot build its model" in err


def test_the_arrays_of_an_npz_left_out_are_named(tmp_path, capsys):
    """An integer array (or one of one element) beside float ones vanished from the table."""
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    np.savez(tmp_path / "x.npz", w=x, steps=np.arange(3), lr=np.float32(0.1))
    assert main(["formats", "fp8_e4m3", "--tensor", str(tmp_path / "x.npz")]) == 0
    captured = capsys.readouterr()
    assert list(rows(captured.out)) == ["w"]
    assert captured.err.count("\n") == 1 and "2 arrays (steps, lr)" in captured.err
    assert "int64" in captured.err and "float32 of one element" in captured.err
