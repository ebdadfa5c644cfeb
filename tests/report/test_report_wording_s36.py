"""Session 36: report.md's lines say what was measured for the task at hand."""


def test_an_image_study_does_not_say_its_loss_covers_only_some_batches(image_study):
    """The per-label table said it covered "the whole validation split, not only the
    --eval-batches of the loss table", but an image classifier ignores --eval-batches (it warns
    so): its loss is over the whole split too."""
    report = (image_study / "report" / "report.md").read_text()
    line = next(line for line in report.splitlines() if line.startswith("What the model forgets"))
    assert "--eval-batches" not in line
    assert "(over the whole validation split, as the loss table's; pooled over the seeds" in line
