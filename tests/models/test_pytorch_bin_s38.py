"""Session 38: a model folder's legacy ``pytorch_model.bin`` of pickle protocol 0 or 1 is named as
`lowbit formats --tensor` names it (it was "neither a zip archive nor a pickle")."""

import pytest
import torch
from safetensors.torch import load_file

from lowbit.cli import main
from tests.llama import save_llama

TINY = ["--steps", "1", "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1"]


@pytest.mark.parametrize("protocol", [0, 1])
def test_a_legacy_pytorch_model_bin_of_protocol_0_or_1_is_named(tmp_path, capsys, protocol):
    folder = tmp_path / "model"
    save_llama(folder)
    weights = folder / "pytorch_model.bin"
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, weights, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    capsys.readouterr()  # save_pretrained's progress bar
    said = (
        f"{weights}: torch's legacy format pickled with protocol {protocol}, which a safe load "
        "(weights_only) does not read (it reads protocols 2 and 3); fix: if you trust the file, "
        "save it again, torch.save(torch.load(path, weights_only=False), 'x.pt')"
    )
    assert main(["train", "--model", str(folder), "--out", str(tmp_path / "run"), *TINY]) == 2
    assert capsys.readouterr().err == f"lowbit: error: {said}\n"
    assert not (tmp_path / "run").exists()
    assert main(["formats", "--tensor", str(weights)]) == 2
    assert capsys.readouterr().err == f"lowbit: error: {said}\n"
