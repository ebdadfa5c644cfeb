"""Session 41: the memory table a run prints adds up in each column, and says what its total is.

Until session 41 the estimate's "logits gradient" row (the loss backward's transient) had no
measured cell, so the measured total was below the estimated peak by that row, and
`lowbit compare`'s tensor-accounting peak left it out too."""

import itertools
import json

import torch
import torch.nn.functional as F

from lowbit.cli import main
from lowbit.memory import measure_activations
from lowbit.models import build_causal_lm
from tests.memory_table import memory_rows

VOCAB = 257  # the byte tokenizer's
TRAIN = ["train", "--model", "nano", "--steps", "2", "--eval-interval", "2", "--eval-batches", "1"]


def summary_table(capsys, argv) -> str:
    assert main([*argv, "--quiet"]) == 0
    out = capsys.readouterr().out
    after = out.split("memory (per component, measured at step 2):\n")[1].splitlines()
    # as `Breakdown.table` wrote it: the summary indents its lines by 4
    return "\n".join(line[4:] for line in itertools.takewhile(lambda x: x[:4] == "    ", after))


def total_note(table: str) -> str:
    """The lines under the table from "(total" on, joined (wrapped to <= 100 columns)."""
    lines = table.splitlines()
    note = lines[next(i for i, line in enumerate(lines) if line.startswith("(total")) :]
    note = note[: next(i for i, line in enumerate(note) if line.endswith(")")) + 1]
    assert all(len(line) <= 100 for line in note), note
    return " ".join(line.strip() for line in note)


def test_every_column_adds_up_to_its_total_and_the_logits_gradient_is_measured(tmp_path, capsys):
    argv = [*TRAIN, "--batch-size", "4", "--seq-len", "16", "--out", str(tmp_path / "run")]
    table = summary_table(capsys, argv)
    rows = memory_rows(table)
    for column in (0, 1):  # estimate, measured
        parts = sum(cells[column] for label, cells in rows.items() if label != "total")
        assert parts == rows["total"][column], table
    # cross-entropy's backward: the nll's and the log-softmax's fp32 gradients of the logits
    assert rows["logits gradient"] == (2 * 4 * 4 * 16 * VOCAB,) * 2, table
    # --grad-accum 1: the gradients, set to None after each step, are made in the backward
    said = (
        "(total: the rows above added, an upper bound of the step's peak: at --grad-accum 1 the "
        "gradients, set to None after each step, are made during the backward"
    )
    assert total_note(table).startswith(said), table


def test_a_run_accumulating_gradients_calls_its_total_the_steps_peak(tmp_path, capsys):
    argv = [*TRAIN, "--batch-size", "4", "--seq-len", "16", "--grad-accum", "2"]
    note = total_note(summary_table(capsys, [*argv, "--out", str(tmp_path / "run")]))
    assert note.startswith("(total: the rows above, all live at the start of a later micro-batch")
    assert "the step's peak" in note and "upper bound" not in note


def test_a_ddp_estimate_with_checkpointing_calls_its_total_an_upper_bound(capsys):
    argv = ["estimate", "--model", "nano", "--gpus", "2", "--seq", "16"]
    assert main([*argv, "--activation-checkpointing"]) == 0
    note = total_note(capsys.readouterr().out)
    assert "the larger of the DDP bucket rebuild" in note
    assert "the latter an upper bound: with activation checkpointing" in note


def test_a_checkpointed_runs_total_is_called_an_upper_bound(tmp_path, capsys):
    argv = [*TRAIN, "--batch-size", "2", "--seq-len", "16", "--activation-checkpointing"]
    table = summary_table(capsys, [*argv, "--out", str(tmp_path / "run")])
    note = total_note(table)
    assert "an upper bound of the step's peak" in note
    assert "with activation checkpointing the recomputed block is live only after" in note
    assert "all live at the start" not in note


def test_the_digits_cnns_measured_table_counts_its_logits_gradient(tmp_path, capsys):
    argv = ["train", "--task", "image-classification", "--steps", "2", "--batch-size", "8"]
    table = summary_table(capsys, [*argv, "--out", str(tmp_path / "run")])
    rows = {line[:24].strip(): line[24:38].replace(",", "") for line in table.splitlines()}
    assert int(rows["logits gradient"]) == 2 * 4 * 8 * 10  # 10 digit classes
    parts = sum(int(v) for k, v in rows.items() if v.strip().isdigit() and k != "total")
    assert parts == int(rows["total"]), table


def test_measure_activations_measures_the_loss_backwards_transient_and_writes_no_grad():
    torch.manual_seed(0)
    model = build_causal_lm("nano", VOCAB, seed=0)
    ids = torch.randint(0, VOCAB, (3, 8))

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())

    saved = measure_activations(model, forward)
    assert saved.logits_gradient == 2 * 4 * 3 * 8 * VOCAB
    assert all(p.grad is None for p in model.parameters())


def test_compares_tensor_accounting_peak_counts_the_logits_gradient(tmp_path):
    out = tmp_path / "study"
    argv = ["compare", "--recipes", "fp32", "--seeds", "1", "--model", "nano", "--steps", "1"]
    argv += ["--seq-len", "16", "--batch-size", "2", "--eval-batches", "1", "--no-plots"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "report" / "results.json").read_text())["recipes"]["fp32"]
    held = results["memory_bytes"]
    assert held["logits_gradient"] == 2 * 4 * 2 * 16 * VOCAB
    assert results["peak_memory_bytes"] == held["total"]
    parts = ("parameters", "gradients", "master_weights", "optimizer_states", "activations")
    transients = ("logits_gradient", "backward_workspace")
    assert held["total"] == sum(held[k] for k in (*parts, "temporaries", *transients))
    # the report's table shows it beside the components, per parameter as they are
    report = (out / "report" / "report.md").read_text()
    head = next(line for line in report.splitlines() if "| peak memory |" in line)
    assert "| temp | logits grad | bwd workspace | model states |" in head
    per = results["bytes_per_param"]
    cells = f"| {per['logits_gradient']:.2f} | {per['backward_workspace']:.2f} | 16.00 |"
    assert cells in report  # fp32: 16 bytes of model states
