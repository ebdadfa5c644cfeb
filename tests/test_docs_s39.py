"""The docs against the code (session 39): the Python blocks of README.md ("As a library") run as a
reader copies them (docs/recipes.md's "Your own recipe" script: tests/recipes/test_own_recipe_s35.py
runs it). tests/test_docs_s30.py checks that the names they quote exist; this runs them, so a
changed signature or return value (a keyword renamed, `with_overrides` taking another argument)
fails here too."""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python fenced block of a page, in page order."""
    return [
        (text[: match.start()].count("\n") + 2, match[1])
        for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    ]


def _run_blocks(page: str, text: str, namespace: dict) -> dict:
    """Run a page's Python blocks one after another in ``namespace`` (a later block may use what
    an earlier one imported, as a reader's session would); an error names the block's line."""
    blocks = _python_blocks(text)
    assert blocks, f"{page} has no ```python block"
    for line, code in blocks:
        try:
            exec(compile(code, f"{page}:{line}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{page}: the block at line {line} fails: {error!r}") from error
    return namespace


def _training_loop_inputs() -> dict:
    """What README's loop leaves to the reader: a model, its device, batches and a loss."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    return {
        "model": model,
        "device": "cpu",
        "data": [torch.randn(16, 32) for _ in range(3)],
        "loss_fn": lambda out: out.float().square().mean(),
        "start": [p.detach().clone() for p in model.parameters()],
    }


def test_the_readme_python_blocks_run():
    """README's loop trains (the weights move under fp8-tensorwise) and its recipe variant is
    the one its comments say: fp16-mixed from a loss scale of 2^20, `lm_head` in fp32."""
    namespace = _run_blocks("README.md", (ROOT / "README.md").read_text(), _training_loop_inputs())
    moved = [
        not torch.equal(a, b) for a, b in zip(namespace["start"], namespace["model"].parameters())
    ]
    assert all(moved)
    recipe = namespace["precision"].recipe
    assert recipe.initial_loss_scale == 2.0**20
    assert recipe.overrides[-1].pattern == "lm_head"


def test_the_block_check_catches_a_snippet_that_no_longer_runs():
    page = "```python\nimport lowbit\n\nlowbit.get_recipe('fp8-tensorwise', scaling='row')\n```\n"
    with pytest.raises(AssertionError, match=r"the block at line 2 fails: TypeError"):
        _run_blocks("page.md", page, {})
