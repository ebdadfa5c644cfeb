"""Session 32: `lowbit formats --tensor` on packed fp4 tensors, and `sqnr` on mismatched shapes."""

import math
import warnings

import pytest
import torch
from safetensors.torch import save_file

from lowbit.cli import main
from lowbit.errors import UsageError
from lowbit.formats.error import sqnr


def packed_fp4(rows: int, cols: int) -> torch.Tensor:
    """A ``float4_e2m1fn_x2`` tensor (two fp4 codes a byte), as packed NVFP4/MXFP4 weights are."""
    return torch.randint(0, 256, (rows, cols), dtype=torch.uint8).view(torch.float4_e2m1fn_x2)


def test_packed_fp4_tensors_are_skipped_with_a_note(tmp_path, capsys):
    """A float4_e2m1fn_x2 tensor, which PyTorch cannot convert to fp32, ended the command in a
    NotImplementedError traceback ("copy_kernel" not implemented), in a .pt file and in a
    .safetensors one alike; the other tensors are measured, the packed one named on stderr."""
    state = {"w": torch.randn(4, 32), "packed.weight": packed_fp4(4, 16)}
    torch.save(state, tmp_path / "mixed.pt")
    save_file(state, str(tmp_path / "mixed.safetensors"))
    for name in ("mixed.pt", "mixed.safetensors"):
        assert main(["formats", "--tensor", str(tmp_path / name)]) == 0
        captured = capsys.readouterr()
        assert [line.split()[0] for line in captured.out.splitlines()[2:]] == ["w"]
        assert captured.err == (
            "lowbit formats: note: 1 tensor (packed.weight) of packed dtype float4_e2m1fn_x2, "
            "which PyTorch cannot convert to fp32, through which every format quantizes; "
            "not measured\n"
        )


def test_a_file_of_packed_fp4_tensors_alone_is_a_one_line_error(tmp_path, capsys):
    torch.save({f"layer{i}": packed_fp4(2, 8) for i in range(5)}, tmp_path / "fp4.pt")
    assert main(["formats", "--tensor", str(tmp_path / "fp4.pt")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"lowbit: error: {str(tmp_path / 'fp4.pt')!r}: 5 tensors (layer0, layer1, layer2 and 2 "
        "more) of packed dtype float4_e2m1fn_x2, which PyTorch cannot convert to fp32, through "
        "which every format quantizes, and no other floating-point tensor; fix: pass the "
        "checkpoint before it was packed (fp32, bf16, fp16 or fp8 tensors)\n"
    )


def test_sqnr_refuses_an_approximation_that_widens_the_reference():
    """An (n,) approximation of an (n, 1) reference broadcast to (n, n) and compared every pair
    of entries: an exact copy of [[1], [2]] measured 3.98 dB, without a word."""
    reference = torch.tensor([[1.0], [2.0]])
    with pytest.raises(UsageError, match=r"shape \(2,\) does not match the reference's \(2, 1\)"):
        sqnr(reference, reference.flatten())
    with pytest.raises(UsageError, match=r"fix: pass tensors of one shape"):
        sqnr(torch.zeros(3), torch.zeros(4))
    assert sqnr(reference, reference.clone()) == math.inf
    assert sqnr(torch.tensor([1.0, 2.0, 3.0]), torch.tensor(2.0)) == pytest.approx(8.451, abs=1e-3)


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
def test_each_tensor_of_a_nested_tensor_is_a_row(tmp_path, capsys, layout):
    """A nested tensor (saved activations of variable-length sequences) ended the command in a
    traceback: "to_dense does not support layout Jagged", or for the strided layout a
    NotImplementedError (aten::ne); each of its tensors is measured, named as a list's would be."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the strided layout's "prototype" warning
        nested = torch.nested.nested_tensor([torch.randn(3, 40), torch.randn(2, 40)], layout=layout)
    torch.save({"acts": nested, "w": torch.randn(4, 32)}, tmp_path / "nested.pt")
    assert main(["formats", "--tensor", str(tmp_path / "nested.pt")]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["acts.0", "acts.1", "w"]
