"""Session 38: `lowbit formats --tensor` as a CNN user reads it: a convolution's weight measured as
its GEMM quantizes it, a safetensors model's rows in layer order, and files torch.save did not
write refused in one line saying what they are."""

import io
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lowbit.cli import main
from lowbit.formats import quantize
from lowbit.formats.error import sqnr


def table(out: str) -> dict[str, list[float]]:
    """Each row of the SQNR table (below its title and header): name -> its cells in dB."""
    lines = [line.split() for line in out.splitlines()[2:] if not line.startswith("note:")]
    return {name: [float(cell) for cell in cells] for name, *cells in lines}


def npy_bytes(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array)
    return stream.getvalue()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.savez(stream, **arrays)
    return stream.getvalue()


def header(out: str) -> list[str]:
    return out.splitlines()[1].split()[1:]


def test_a_conv_weight_is_measured_along_c_kh_kw_as_its_gemm_reads_it(tmp_path, capsys):
    """A 16 x 8 x 3 x 3 Conv2d weight was quantized along its last axis, kw: blocks of 3 entries,
    int8/axis read 52 dB on the digits CNN where training (the 16 x 72 matrix `LowbitConv2d`
    multiplies) gets 47."""
    torch.manual_seed(0)
    weight = torch.nn.Conv2d(8, 16, 3).weight.detach()
    torch.save({"conv.weight": weight}, tmp_path / "w.pt")
    assert main(["formats", "--tensor", str(tmp_path / "w.pt")]) == 0
    out = capsys.readouterr().out
    cells = dict(zip(header(out), table(out)["conv.weight"]))
    matrix = weight.reshape(16, -1)
    for label, fmt, granularity in [
        ("int8/axis", "int8", "axis"),
        ("fp8_e4m3/mx", "fp8_e4m3", "mx"),
        ("fp4_e2m1/nvfp4", "fp4_e2m1", "nvfp4"),
    ]:
        expected = sqnr(matrix, quantize(matrix, fmt, granularity).dequantize())
        assert cells[label] == pytest.approx(expected, abs=0.006), label
    assert "a 4-D tensor's along C*kh*kw" in out.splitlines()[0]


def test_a_safetensors_models_rows_follow_its_layer_numbers(tmp_path, capsys):
    """A safetensors header lists names in string order: layers.10 and layers.11 came between
    layers.1 and layers.2, and each shard of a folder kept its own order."""
    names = [f"model.layers.{i}.mlp.weight" for i in range(12)]
    save_file({name: torch.randn(4, 32) for name in names[::2]}, tmp_path / "a.safetensors")
    save_file({name: torch.randn(4, 32) for name in names[1::2]}, tmp_path / "b.safetensors")
    assert main(["formats", "--tensor", str(tmp_path)]) == 0
    assert list(table(capsys.readouterr().out)) == names


@pytest.mark.parametrize(
    "write, what",
    [
        (lambda path: path.write_text("step,loss\n1,2.3\n"), "a text file"),
        (lambda path: path.write_bytes(b""), "an empty file"),
        (lambda path: path.write_bytes(np.ones(3).dumps()), "a plain pickle"),
        (
            lambda path: path.write_bytes(npy_bytes(np.ones((3, 4)))),
            "a numpy .npy file: torch.save(torch.from_numpy(numpy.load(path)), 'x.pt') saves it",
        ),
        (
            lambda path: save_file({"w": torch.ones(2, 2)}, path),
            "a safetensors file: name it w.safetensors",
        ),
        (
            lambda path: torch.jit.save(torch.jit.script(torch.nn.Conv2d(1, 2, 3)), path),
            "a TorchScript archive: torch.save(torch.jit.load(path).state_dict(), 'x.pt') saves "
            "its weights",
        ),
        (
            lambda path: path.write_bytes(npz_bytes(w=np.ones((3, 4)))),
            "a numpy .npz archive: torch.save({k: torch.from_numpy(v) for k, v in "
            "numpy.load(path).items()}, 'x.pt') saves it",
        ),
        (
            lambda path: path.write_bytes(bytes(range(7, 256)) * 4),
            "neither a zip archive nor a pickle",
        ),
    ],
)
def test_a_file_torch_save_did_not_write_says_what_it_is(tmp_path, capsys, write, what):
    """torch.load's reasons named nothing a user could act on: a text file was "(101)", a plain
    pickle "(Unsupported operand 149)" under a UserWarning about pickle protocols, an empty file
    "(EOFError)", a TorchScript archive (torch.jit.save of a CNN) a page of torch's text under a
    warning."""
    path = tmp_path / "w.pt"
    write(path)
    assert main(["formats", "--tensor", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"lowbit: error: {path}: not a file torch.save wrote ({what}); fix: pass a .pt file "
        "saved with torch.save (tensors, state dicts, lowbit checkpoints) or a .safetensors file\n"
    )


def test_a_torch_file_cut_short_says_so(tmp_path, capsys):
    """A torch file cut short (an interrupted save or copy) read "cannot read it as a torch file
    ([Errno 22] Invalid argument)"."""
    torch.save({"w": torch.randn(256, 256)}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "w.pt").write_bytes(data[: len(data) // 2])
    assert main(["formats", "--tensor", str(tmp_path / "w.pt")]) == 2
    assert capsys.readouterr().err == (
        f"lowbit: error: {tmp_path / 'w.pt'}: a zip archive without the directory at its end: cut "
        "short (an interrupted save or copy); fix: save or copy it again\n"
    )


def test_a_file_of_integer_tensors_says_what_it_holds_and_the_fix(tmp_path, capsys):
    torch.save({"labels": torch.arange(10), "scale": torch.ones(1)}, tmp_path / "w.pt")
    assert main(["formats", "--tensor", str(tmp_path / "w.pt")]) == 2
    assert capsys.readouterr().err == (
        f"lowbit: error: {str(tmp_path / 'w.pt')!r} holds no floating-point tensor with values "
        "and more than one element (its tensors: float32 of one element, int64); fix: pass a "
        "file of floating-point weights or activations (an integer tensor of values: save "
        "x.float())\n"
    )


def test_the_format_table_matches_ml_dtypes_and_says_what_its_columns_cannot(capsys):
    """Every limit printed is ml_dtypes' to the digits shown; int8's max of 127 read as
    -128..127 and e8m0 as a signed float: a line under the table says which they are."""
    import ml_dtypes

    from tests.formats.conftest import REFERENCE_TYPES

    assert main(["formats"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in out[2:]}
    references = {**REFERENCE_TYPES, "fp32": np.float32, "e8m0": ml_dtypes.float8_e8m0fnu}
    for name, dtype in references.items():
        info = ml_dtypes.finfo(dtype)
        bits, e, m, _, *limits = rows[name][1:9]
        assert (int(bits), int(e), int(m)) == (info.bits, info.nexp, info.nmant), name
        expected = [info.max, info.smallest_normal, info.smallest_subnormal, info.eps]
        assert [float(x) for x in limits] == pytest.approx([float(x) for x in expected], 1e-4)
    assert out[-2:] == [
        "int8, int4: symmetric, -127..127 and -7..7 (the most negative code is unused)",
        "e8m0: no sign bit, the powers of two 2^-127..2^127 (MX block scales)",
    ]


def test_torchs_legacy_format_is_read_up_to_protocol_3_and_named_past_it(tmp_path, capsys):
    """A legacy file (``_use_new_zipfile_serialization=False``) of pickle protocol 3 was read
    under two UserWarnings about protocols; one of protocol 4 failed "(Unsupported operand 149)"
    under the same warning."""
    for protocol in (2, 3, 4):
        torch.save(
            {"w": torch.randn(4, 32)},
            tmp_path / f"p{protocol}.pt",
            _use_new_zipfile_serialization=False,
            pickle_protocol=protocol,
        )
    for protocol in (2, 3):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert main(["formats", "--tensor", str(tmp_path / f"p{protocol}.pt")]) == 0
        assert [str(warning.message) for warning in seen] == []
        assert list(table(capsys.readouterr().out)) == ["w"]
    assert main(["formats", "--tensor", str(tmp_path / "p4.pt")]) == 2
    assert capsys.readouterr().err == (
        f"lowbit: error: {tmp_path / 'p4.pt'}: torch's legacy format pickled with protocol 4, "
        "whose frames a safe load (weights_only) does not read; fix: if you trust the file, save "
        "it again, torch.save(torch.load(path, weights_only=False), 'x.pt')\n"
    )
