"""A memory estimate and real training in one process share Hadamard-transformed layers' signs.

The estimate builds its model on fake tensors; a layer's random signs first drawn there were
cached fake, and the next real mxfp4 or nvfp4 backward in the process failed on them (a
data-dependent check of a fake tensor): whether a script or a test worker could train depended on
whether it had estimated first. Each case runs in a fresh process, where nothing is cached yet.
"""

import subprocess
import sys
from pathlib import Path

import torch

import lowbit


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))


def gradient_sums(recipe: str) -> list[float]:
    """The gradient sums of one training step of the MLP converted to ``recipe``."""
    model = mlp()
    lowbit.convert(model, recipe)
    model(torch.randn(32, 64)).square().mean().backward()
    return [float(p.grad.double().sum()) for p in model.parameters()]


SCRIPT = """
import sys
import torch
import lowbit
from lowbit.memory import estimate
from tests.nn.test_signs_after_estimate_s40 import gradient_sums, mlp

torch.set_num_threads(1)  # as the test's own process, which trains alone for the reference
recipe, order = sys.argv[1], sys.argv[2].split(",")
for i, what in enumerate(order):
    if what == "convert-in-inference":
        with torch.inference_mode():
            lowbit.convert(mlp(), recipe)
    elif what == "estimate":  # a new batch each time: a fresh trace
        assert estimate("nano", recipe, batch=2 + i, seq=8).activations > 0
    else:
        print(gradient_sums(recipe))
"""


def _run(recipe: str, order: str) -> list[str]:
    """The gradient sums the script prints, running ``order`` (comma-separated steps)."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, recipe, order],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()


def test_training_after_an_estimate_or_an_inference_mode_convert_gives_the_same_gradients():
    """Estimate, train, estimate again, train again: each time the gradients of training alone
    (nvfp4's layers draw the same kind of signs: mxfp4 stands for both). And after a model
    converted under `torch.inference_mode()` (a serving process that later fine-tunes), whose
    signs were an inference tensor in the cache: the backward failed ("Inference tensors do not
    track version counter")."""
    alone = [str(gradient_sums("mxfp4"))]  # training alone: the same in any process
    assert _run("mxfp4", "estimate,train,estimate,train") == alone * 2
    assert _run("mxfp4", "convert-in-inference,train") == alone
