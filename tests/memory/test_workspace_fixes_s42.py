"""Session 42 (review R1 of the backward workspace row): measuring it records the CPU allocator
with torch's profiler (`lowbit.memory.measure_activations` with ``backward=True``, which
`lowbit train`'s memory report and `lowbit compare` run). Until this fix a user's own profiler
around it ended with no events (ours stopped theirs), a process without stderr (``2>&-``) failed
at the report, torch's allocator warning (``[W... CPUAllocator.cpp:245] Memory block of unknown
size was allocated before the profiling started``) reached the user's stderr, and the table's
note lost its logits-gradient sentence where the workspace was measured. Review R9: stderr was then
held for the whole measured step, so a process that died in it lost what it had said there."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lowbit.memory import Breakdown, measure_activations

ROOT = Path(__file__).resolve().parents[2]

# the tiny digits CNN's measured step, in a fresh process: a forward that frees a tensor made
# before it (as a run's step frees the last step's), which makes torch's allocator warn
SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.nn.functional as F
    import lowbit
    from lowbit.memory import measure_activations
    from lowbit.models.cnn import build_cnn
    if sys.argv[1] == "no-stderr":  # as `2>&-` leaves Python
        os.close(2)
        sys.stderr = None
    elif sys.argv[1] == "no-fd":  # descriptor 2 closed under a Python stream
        os.close(2)
    torch.manual_seed(0)
    images, labels = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    precision = lowbit.Precision("fp8-tensorwise")
    model = precision.convert(build_cnn("tiny"))
    made_before = [torch.ones(1 << 16)]

    def forward():
        made_before.clear()
        if sys.argv[1] in ("open", "dies"):
            print("lowbit: warning: said in the window", file=sys.stderr, flush=True)
        if sys.argv[1] == "dies":  # as a crash in a kernel: no Python cleanup runs
            os._exit(3)
        with precision.autocast():
            return F.cross_entropy(model(images).float(), labels)

    print(measure_activations(model, forward, backward=True).backward_workspace)
    """
)


def _run(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )


def test_torchs_profiler_lines_are_dropped_and_the_runs_own_warnings_kept():
    done = _run("open")
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 0
    assert done.stderr == "lowbit: warning: said in the window\n"


def test_a_process_that_dies_in_the_measured_step_keeps_what_it_said_there():
    done = _run("dies")
    assert done.returncode == 3
    assert "lowbit: warning: said in the window" in done.stderr


@pytest.mark.parametrize("mode", ["no-stderr", "no-fd"])
def test_a_process_without_stderr_is_measured(mode):
    done = _run(mode)
    assert done.returncode == 0, done.stdout
    assert int(done.stdout) > 0


def _cnn():
    import torch.nn.functional as F

    import lowbit
    from lowbit.models.cnn import build_cnn

    torch.manual_seed(0)
    images, labels = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    precision = lowbit.Precision("fp8-tensorwise")
    model = precision.convert(build_cnn("tiny"))

    def forward():
        with precision.autocast():
            return F.cross_entropy(model(images).float(), labels)

    return model, forward


def test_a_users_profiler_keeps_its_events_and_the_workspace_is_left_unmeasured():
    model, forward = _cnn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        saved = measure_activations(model, forward, backward=True)
        torch.mm(torch.ones(4, 4), torch.ones(4, 4))
    assert any(e.name == "aten::mm" for e in prof.events())
    assert saved.backward_workspace == 0 and saved.activations > 0
    # without a profiler on, it is measured
    assert measure_activations(model, forward, backward=True).backward_workspace > 0


def test_the_total_note_keeps_the_logits_gradient_with_the_workspace():
    rows = dict(parameters=1000, activations=5000, logits_gradient=800, num_params=250)
    table = " ".join(Breakdown(**rows, backward_workspace=3000).table().split())
    assert "the logits gradient, the loss backward's transient, is freed" in table
    assert "the backward workspace is what the step's peak holds" in table
