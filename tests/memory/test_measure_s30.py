import torch

import lowbit
from lowbit.cli import main
from lowbit.memory import measure_activations


def _histories_after_three_steps(measure_at_step_2: bool) -> list[torch.Tensor]:
    """The amax histories of an fp8-delayed model with dropout after three steps of one batch,
    with or without measuring its activations after the second step's backward (where the
    trainer's memory report does). The measuring forward takes the batch times 4, so that its
    amaxes exceed the step's own for certain (dropout's other masks, the trainer's case, exceed
    them in some layers only)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.Dropout(0.5), torch.nn.Linear(64, 16)
    )
    precision = lowbit.Precision("fp8-delayed", device="cpu")
    model = precision.convert(model).train()
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.randn(8, 32)

    def forward(batch):
        with precision.autocast():
            return model(batch).square().mean()

    for step in range(3):
        precision.backward(forward(x))
        if measure_at_step_2 and step == 1:
            with torch.random.fork_rng(devices=[]):  # as the trainer does: dropout draws apart
                assert measure_activations(model, lambda: forward(4 * x)).activations > 0
        precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    return [
        history.history.clone()
        for module in model.modules()
        for history in getattr(getattr(module, "lowbit_state", None), "histories", {}).values()
    ]


def test_measuring_activations_leaves_the_delayed_scaling_histories_as_they_were():
    # The measuring forward recorded its amaxes into the histories' pending amax: a larger one
    # entered the next commit, so a run that took the trainer's memory report at step 2 (a BERT
    # tagger under fp8-delayed: dropout draws other masks in the report's forward) scaled its fp8
    # operands otherwise from step 3 on than the same run without the report.
    measured = _histories_after_three_steps(measure_at_step_2=True)
    plain = _histories_after_three_steps(measure_at_step_2=False)
    assert measured and len(measured) == len(plain)
    for a, b in zip(measured, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_live_only_memory_report_is_titled_measured(tmp_path, capsys):
    # The CNN has no estimate, so the trainer printed its measured breakdown alone, under the
    # column title "estimate" (`Breakdown.table`'s default for a single column).
    argv = ["train", "--task", "image-classification", "--model", "tiny", "--steps", "2"]
    argv += ["--batch-size", "8", "--eval-batches", "1", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = printed.split("memory (per component, measured at step 2):\n", 1)[1]
    assert report.splitlines()[0].split() == ["component", "measured", "B/param"]
