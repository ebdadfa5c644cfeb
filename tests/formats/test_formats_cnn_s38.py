"""Session 38: `lowbit formats --tensor` as a CNN user reads it: a convolution's weight measured as
its GEMM quantizes it, a safetensors model's rows in layer order, and files torch.save did not
write refused in one line saying what they are."""

import builtins
import errno
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
    assert out.splitlines()[-1] == (
        "note: conv.weight: 4-D weights, measured as Conv2d weights, the O x C*kh*kw matrix "
        "their GEMM multiplies (quantized along C*kh*kw, not kw)"
    )


def test_a_4d_tensor_not_named_weight_is_measured_along_its_last_axis(tmp_path, capsys):
    """Every 4-D tensor was reshaped to O x rest: an N x C x H x W activation's int8/axis read
    35.35 dB where along its last axis (as before, and as it quantizes) it reads 48.15, without a
    word. Only a name ending in "weight" (a Conv2d's state-dict key) is read as a convolution."""
    torch.manual_seed(0)
    activation = torch.randn(4, 8, 6, 6) * torch.rand(1, 1, 6, 1) * 10
    weight = torch.nn.Conv2d(8, 16, 3).weight.detach()
    torch.save({"act": activation, "conv.weight": weight}, tmp_path / "w.pt")
    assert main(["formats", "--tensor", str(tmp_path / "w.pt")]) == 0
    out = capsys.readouterr().out
    rows = table(out)
    for name, matrix in [("act", activation), ("conv.weight", weight.reshape(16, -1))]:
        cells = dict(zip(header(out), rows[name]))
        expected = sqnr(matrix, quantize(matrix, "int8", "axis").dequantize())
        assert cells["int8/axis"] == pytest.approx(expected, abs=0.006), name
    assert out.splitlines()[0] == "SQNR in dB (higher is better; quantized along the last axis)"
    assert [line for line in out.splitlines() if line.startswith("note:")] == [
        "note: conv.weight: 4-D weights, measured as Conv2d weights, the O x C*kh*kw matrix "
        "their GEMM multiplies (quantized along C*kh*kw, not kw)"
    ]


def test_a_safetensors_models_rows_follow_its_layer_numbers(tmp_path, capsys):
    """A safetensors header lists names in string order: layers.10 and layers.11 came between
    layers.1 and layers.2, and each shard of a folder kept its own order."""
    names = [f"model.layers.{i}.mlp.weight" for i in range(12)]
    save_file({name: torch.randn(4, 32) for name in names[::2]}, tmp_path / "a.safetensors")
    save_file({name: torch.randn(4, 32) for name in names[1::2]}, tmp_path / "b.safetensors")
    assert main(["formats", "--tensor", str(tmp_path)]) == 0
    assert list(table(capsys.readouterr().out)) == names


def test_a_name_with_a_digit_regex_does_not_read_as_a_number_is_ordered(tmp_path, capsys):
    """'²' is a digit to str.isdigit() but not to \\d (nor to int()): a safetensors file with such
    a name failed with a ValueError traceback."""
    names = ["layers.2.w", "layers.10.w", "x²", "x²0", "²"]
    save_file({name: torch.randn(4, 32) for name in names}, tmp_path / "w.safetensors")
    assert main(["formats", "--tensor", str(tmp_path / "w.safetensors")]) == 0
    assert list(table(capsys.readouterr().out)) == ["layers.2.w", "layers.10.w", "x²", "x²0", "²"]


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
        # bytes 8-9 '{"' alone were called a safetensors file
        (lambda path: path.write_text('        {"a": 1}\n'), "a text file"),
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
        "which a safe load (weights_only) does not read (it reads protocols 2 and 3); fix: if you "
        "trust the file, save it again, torch.save(torch.load(path, weights_only=False), 'x.pt')\n"
    )


@pytest.mark.parametrize(
    "legacy, protocol, what",
    [(True, 0, "torch's legacy format"), (True, 1, "torch's legacy format")]
    + [(False, protocol, "a torch zip archive") for protocol in (0, 1, 4, 5)],
)
def test_a_torch_file_of_a_protocol_a_safe_load_does_not_read_names_it(
    tmp_path, capsys, legacy, protocol, what
):
    """A legacy file of protocol 0 or 1 was "neither a zip archive nor a pickle"; a zip archive
    saved with pickle_protocol 4 or 5 read "(Unsupported operand 149)", 0 or 1 "(... 100)"."""
    path = tmp_path / "w.pt"
    torch.save(
        {"w": torch.randn(4, 32)},
        path,
        _use_new_zipfile_serialization=not legacy,
        pickle_protocol=protocol,
    )
    assert main(["formats", "--tensor", str(path)]) == 2
    if not legacy and protocol < 2:  # no PROTO opcode in the archive's pickle to tell them apart
        protocol = "0 or 1"
    assert capsys.readouterr().err == (
        f"lowbit: error: {path}: {what} pickled with protocol {protocol}, which a safe load "
        "(weights_only) does not read (it reads protocols 2 and 3); fix: if you trust the file, "
        "save it again, torch.save(torch.load(path, weights_only=False), 'x.pt')\n"
    )


@pytest.mark.parametrize(
    "error", [PermissionError(errno.EACCES, "Permission denied"), OSError(errno.EIO, "I/O error")]
)
def test_a_file_that_cannot_be_read_names_the_os_error(tmp_path, capsys, monkeypatch, error):
    """Opening the file to look at its first bytes came before the read's error handling: a
    file denied to the user was told to "choose a path you may write to", and an I/O error was
    a traceback."""
    path = tmp_path / "w.pt"
    torch.save({"w": torch.randn(4, 32)}, path)
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if str(file) == str(path):
            raise type(error)(error.errno, error.strerror, str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    assert main(["formats", "--tensor", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lowbit: error: {path}: cannot read it as a torch file ([Errno ")
    assert error.strerror in err and len(err.splitlines()) == 1
