"""Session 41: `lowbit doctor` and the statistics list only the GEMMs that ran, and count as
saturated only what a cast clipped beyond rounding.

The digits CNN's first convolution reads the pixels, which need no gradient: its input-gradient
GEMM never runs, yet its ``grad_input.w`` row was a copy of ``forward.w`` (the tensorwise weight
is quantized once, in the forward, and observed there). And fp8-delayed flagged that CNN's second
convolution weight for saturation (0.4-0.6% of its values "clipped" from the probe's second
step): its amax had grown 0.3-1% past the history's, so those values rounded to e4m3's largest,
448, as they would with no limit on the range, losing nothing that rounding did not."""

import json

import torch

from lowbit.cli import main
from lowbit.diagnostics.stats import operand_stats
from lowbit.nn.operand import AmaxHistory, quantize_operand
from lowbit.recipes import OperandSpec

CNN = ["doctor", "--task", "image-classification", "--batch-size", "16", "--probe-steps", "2"]


def _report(tmp_path, *args) -> dict:
    out = tmp_path / "doctor"
    assert main([*args, "--out", str(out)]) == 0
    return json.loads((out / "doctor.json").read_text())


def _operands(report: dict) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for row in report["rows"]:
        found.setdefault(row["layer"], set()).add(row["operand"])
    return found


def test_the_first_convolution_input_gradient_is_not_computed_and_has_no_row(tmp_path, capsys):
    report = _report(tmp_path, *CNN, "--recipe", "fp8-tensorwise")
    operands = _operands(report)
    assert operands["features.0"] == {
        "forward.x",
        "forward.w",
        "grad_weight.grad_out",
        "grad_weight.x",
    }
    assert len(operands["features.2"]) == 6
    assert report["not_computed"] == ["features.0/grad_input"]
    assert "not computed, so not in the table: features.0 grad_input" in capsys.readouterr().out


def test_a_language_model_first_layer_reads_embeddings_and_its_input_gradient_runs(tmp_path):
    """Checked, not assumed: the embeddings need a gradient, so every layer's six operands ran."""
    report = _report(
        tmp_path,
        *["doctor", "--recipe", "fp8-tensorwise", "--model", "nano", "--probe-steps", "1"],
        *["--seq-len", "16", "--batch-size", "2"],
    )
    assert report["not_computed"] == []
    assert all(len(ops) == 6 for ops in _operands(report).values())
    assert "model.layers.0.self_attn.q_proj" in _operands(report)


def test_training_statistics_log_no_operand_of_a_gemm_that_did_not_run(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--task", "image-classification", "--recipe", "fp8-tensorwise"]
    args += ["--steps", "1", "--batch-size", "16", "--stats-interval", "1", "--out", str(run)]
    assert main(args) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    stats = next(r for r in records if r.get("split") == "stats")
    first = {key.split("/")[1] for key in stats if key.startswith("features.0/")}
    assert first == {"forward.x", "forward.w", "grad_weight.grad_out", "grad_weight.x"}


def test_delayed_scaling_of_a_grown_weight_is_not_flagged_for_values_it_rounds(tmp_path):
    report = _report(tmp_path, *CNN, "--recipe", "fp8-delayed")
    assert [row for row in report["rows"] if row["reason"]] == []
    assert report["suggestions"] == []


def _delayed(x: torch.Tensor, amax: float):
    spec = OperandSpec("fp8_e4m3", scaling="delayed")
    history = AmaxHistory(4)
    quantize_operand(torch.full((1,), amax), spec, history=history)
    history.commit()
    return operand_stats(x, quantize_operand(x, spec, history=history))


def test_saturated_counts_values_clipped_beyond_rounding():
    """16 values, the largest at 1.03, 1.05 and 2 x the delayed amax: scaled to 461, 470 and
    896. 461 rounds to e4m3's largest, 448, as it would with no limit on the range; 470 lies
    past 464, half of e4m3's top step (32) above 448, and is clipped; 896 too."""
    x = torch.linspace(-1, 1, 16)
    shares = []
    for top in (1.03, 1.05, 2.0):
        x[-1] = top
        shares.append(_delayed(x, 1.0)["saturated"])
    assert shares == [0.0, 1 / 16, 1 / 16]


def test_an_ieee_cast_saturates_where_it_overflows():
    """fp16 overflows to inf from 65520, half its top step (32) above 65504: 65510 rounds to
    65504 and is not counted, 65520 is (inf)."""
    x = torch.tensor([[65510.0, 65520.0, 1.0, 2.0]])
    stats = operand_stats(x, quantize_operand(x, OperandSpec("fp16")))
    assert stats["saturated"] == 0.25 and stats["nonfinite"] == 0.25


def test_a_block_whose_scale_rounds_to_zero_is_flushed_not_saturated():
    """NVFP4: a block 1e7 x below the tensor's largest gets an e4m3 block scale of zero, and its
    values come back zero: flushed (the nano LM's gradients, 0.1% of some, read as saturated)."""
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 1e-5
    x[0, :16] = 100.0
    stats = operand_stats(x, quantize_operand(x, OperandSpec("fp4_e2m1", granularity="nvfp4")))
    assert stats["saturated"] == 0.0 and stats["underflow"] > 0.9


def test_e4m3s_tie_rounds_to_its_largest_value_and_is_not_clipped():
    """Review R4: e4m3's midpoint 464 (scaled) counted as clipped, though round-to-nearest-even
    takes it to 448 (14 steps of 32, even) as it would with no limit on the range; 465 is
    clipped. fp16's midpoint, 65520, rounds up (65504 is 2047 steps) and stays counted above."""
    from lowbit.formats import quantize

    x = torch.tensor([[464.0, 465.0, 1.0, 2.0]])
    q = quantize(x, "fp8_e4m3", "tensor", amax=torch.tensor(448.0))
    assert operand_stats(x, q)["saturated"] == 0.25


def test_the_heat_map_and_the_table_name_a_gemm_not_computed_alike(tmp_path, capsys, monkeypatch):
    """Review R4: the heat map said "not run" of the GEMMs the table called "not computed" (and
    "not run" names the layers no probe called); the line named input gradients alone, though a
    frozen weight's gradient is not computed either."""
    from matplotlib.figure import Figure

    labels = []
    real_savefig = Figure.savefig

    def savefig(figure, *args, **kwargs):
        labels.extend(t.get_text() for ax in figure.axes for t in ax.texts)
        return real_savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    _report(tmp_path, *CNN, "--recipe", "fp8-tensorwise")
    assert "or the weight gradient of a frozen weight" in capsys.readouterr().out
    gray = [label.replace("\n", " ") for label in labels if label.startswith("not")]
    assert gray and set(gray) == {"not computed"}
