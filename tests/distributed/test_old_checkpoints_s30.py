"""Session 30: multi-process checkpoints written before lowbit kept a float lr for torchao's
optimizer states (they hold torchao's 0-dim tensor lr) still resume."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from lowbit.train import TrainConfig, train
from tests.distributed.helpers import TINY


def _as_before_session_30(folder) -> None:
    """Rewrite a DCP checkpoint folder as lowbit wrote it before session 30: every param group's
    lr a 0-dim fp32 tensor (torchao's), the rest as saved."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

    flat = folder.parent / "flat.pt"
    dcp_to_torch_save(folder, flat)
    state = torch.load(flat, weights_only=False)
    groups = state["optimizer"]["param_groups"]
    assert groups and all(isinstance(group["lr"], float) for group in groups)
    for group in groups:
        group["lr"] = torch.tensor(group["lr"], dtype=torch.float32)
    rewritten = folder.parent / "rewritten.dcp"
    torch.save(state, flat)
    torch_save_to_dcp(flat, rewritten)
    for item in folder.iterdir():  # lowbit's own rank-0 file stays; DCP's files are replaced
        if item.suffix in (".distcp", "") and item.name != "lowbit.pt":
            item.unlink()
    for item in rewritten.iterdir():
        shutil.copy(item, folder / item.name)


@pytest.mark.parametrize("state_precision", ["8bit", "fp8"])
def test_a_multi_process_checkpoint_with_a_tensor_lr_resumes(tmp_path, state_precision):
    """DCP refused the old checkpoints ("expected BytesStorageMetadata but found
    TensorStorageMetadata" for optimizer.param_groups.0.lr), with a traceback."""
    out = tmp_path / "run"
    base = dict(out=str(out), recipe="fp32", optimizer_state=state_precision, strategy="ddp")
    config = TrainConfig(steps=1, save_interval=1, **base, **TINY)
    train(config, quiet=True)
    (checkpoint,) = (out / "checkpoints").glob("*.dcp")
    _as_before_session_30(checkpoint)
    result = train(dataclasses.replace(config, steps=2), resume=True, quiet=True)
    assert result.status == "completed" and result.steps == 2
