"""Golden loss curves: a small parity run (fp32, bf16-mixed, fp8-tensorwise, mxfp4 on a tiny causal
LM) must reproduce the stored per-step training losses (tests/golden/parity_tiny.json, written by
``python benchmarks/parity.py --golden``), so a change in the numerics of a recipe is caught.

Tolerance: the run is deterministic (fixed seed, data order and one thread), so on one machine and
PyTorch build the curves repeat bit for bit. Changing the reduction order on that machine (two
threads instead of one; ``reorder_max_abs``, 0 here: these tiny GEMMs do not split) is covered by
the tolerance, four times that drift and at least 5e-4 (1.4e-4 relative to a loss near 3.7).
Another *kind* of CPU is not: its bf16 GEMMs sum in another order before rounding their outputs to
bf16, and over 12 steps a flipped rounding grows (up to 3e-3 for bf16-mixed and 2e-2 for mxfp4
between AMX, AVX512-BF16, plain AVX-512 and AVX2 kernels), more than fp32 and bf16-mixed differ.
So the file holds one reference per kind of CPU and a rerun must match one of them within the
tolerance; ``test_golden_curves_separate_recipes`` checks that no recipe's curve of any kind comes
within the tolerance of another recipe's, so a recipe whose numerics silently turn into another's
fails.
"""

import itertools
import json
from pathlib import Path

import pytest

from lowbit.report import compare, make_study
from tests.once import folder_once_per_session

GOLDEN = Path(__file__).parents[1] / "golden" / "parity_tiny.json"
DATA = json.loads(GOLDEN.read_text())
TOLERANCE = DATA["tolerance"]  # per recipe, absolute loss
REFERENCES = DATA["references"]  # per kind of CPU: its curves


@pytest.fixture(scope="module")
def rerun(tmp_path_factory):
    """The golden study's results, rerun once per session."""

    def make(folder):
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(DATA["threads"])
        try:
            study = make_study(
                ",".join(DATA["recipes"]),
                DATA["settings"],
                seeds=[DATA["seed"]],
                out=folder / "study",
            )
            return compare(study, plots=False, log=lambda line: None).results
        finally:
            torch.set_num_threads(threads)

    return folder_once_per_session(tmp_path_factory, "golden", make)


@pytest.mark.parametrize("recipe", DATA["recipes"])
def test_loss_curve_matches_golden(rerun, recipe):
    now = [loss for _, loss in rerun["recipes"][recipe]["curves"]["train"]]
    assert len(now) == DATA["settings"]["steps"]
    drifts = {
        kind: max(abs(a - b) for a, b in zip(now, ref["curves"][recipe]["train"], strict=True))
        for kind, ref in REFERENCES.items()
    }
    assert min(drifts.values()) <= TOLERANCE[recipe], (
        f"{recipe}: training loss drifted from every golden curve "
        f"({', '.join(f'{kind} {d:.2e}' for kind, d in drifts.items())}; tolerance "
        f"{TOLERANCE[recipe]:.1e}); if the change is intended, or this is a new kind of CPU, "
        f"rerun: {DATA['regenerate']}"
    )


def test_golden_curves_separate_recipes():
    """The tolerance can catch a recipe turning into another: every pair of stored curves of two
    recipes, of any kinds of CPU, differs by more than either recipe's tolerance at some step."""
    for ref in REFERENCES.values():
        for name in DATA["recipes"]:
            assert 2 * ref["reorder_max_abs"][name] <= TOLERANCE[name]
    for a, b in itertools.permutations(DATA["recipes"], 2):
        for one, other in itertools.product(REFERENCES.values(), repeat=2):
            curve_a, curve_b = one["curves"][a]["train"], other["curves"][b]["train"]
            gap = max(abs(x - y) for x, y in zip(curve_a, curve_b, strict=True))
            assert gap > max(TOLERANCE[a], TOLERANCE[b]), (a, b, gap)
