"""Session 32 hunt of the numerics diagnostics (statistics, `lowbit doctor`, the monitor)."""

import math

import pytest
import torch

from lowbit.diagnostics.stats import operand_stats
from lowbit.nn.operand import quantize_operand
from lowbit.recipes import get_recipe


@pytest.mark.parametrize("recipe", ["fp8-tensorwise", "fp8-delayed"])
@pytest.mark.parametrize("shape", [(0, 64), (4, 0), (2, 0, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_empty_operand_with_a_tensor_scale_has_statistics(recipe, shape, dtype):
    """A tensor-scaled operand with no elements (an empty batch or sequence, a layer without
    features) is quantized with an empty scale grid ((0, 1) for no rows), which the statistics
    read as one scale and crashed on ("shape '[]' is invalid for input of size 0"); the row,
    block and MX scales of the same operand gave the statistics of nothing."""
    spec = get_recipe(recipe).layer_for("fc")[0].operands()["forward.x"]
    x = torch.randn(shape, dtype=dtype)
    stats = operand_stats(x, quantize_operand(x, spec))
    assert stats["sqnr"] == math.inf and stats["scale"] == 1.0
    assert all(stats[k] == 0 for k in ("amax", "rms", "saturated", "underflow", "nonfinite"))


def test_doctor_names_the_layers_the_probe_never_ran(tmp_path, capsys):
    """A mixture-of-experts model whose probe routes no token to some experts: their GEMMs have
    no statistics and vanished from the table and its count ("0 of 60 operands flagged" of 16
    converted layers' 96) without a word, as if judged fine."""
    import json

    from lowbit.cli import main
    from tests.moe import mixtral_config

    mixtral_config(
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_local_experts=8,
        num_experts_per_tok=1,
    ).save_pretrained(tmp_path / "moe")
    out = tmp_path / "doctor"
    args = ["--model", str(tmp_path / "moe"), "--seq-len", "8", "--batch-size", "1"]
    args += ["--device", "cpu", "--recipe", "fp8-tensorwise", "--probe-steps", "1"]
    assert main(["doctor", *args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "doctor.json").read_text())
    judged = {row["layer"] for row in report["rows"]}
    experts = {
        f"model.layers.0.mlp.experts.gemms.{k}.{e}" for k in ("up", "down") for e in range(8)
    }
    idle = set(report["not_run"])
    assert idle and idle <= experts and not idle & judged
    assert experts <= judged | idle  # every expert GEMM is judged or named
    assert f"{len(idle)} low-precision layers never ran in the probe" in printed
