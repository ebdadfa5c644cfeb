"""Golden loss curves: a small parity run (fp32, bf16-mixed, fp8-tensorwise, mxfp4 on a tiny causal
LM) must reproduce the stored per-step training losses (tests/golden/parity_tiny.json, written by
``python benchmarks/parity.py --golden``), so a change in the numerics of a recipe is caught.

Tolerance: the run is deterministic (fixed seed, data order and one thread), so on the machine and
PyTorch build that wrote the file the curves repeat bit for bit. Another CPU or BLAS build sums
fp32 GEMMs in another order (~1e-7 relative per GEMM); over 12 steps of training that grows, and in
a low-precision recipe it can flip a rounding decision of an element. The measured effect of such a
change (two threads instead of one, which reorders the reductions) is stored with the golden file
(``reorder_max_abs``; on the machine that wrote it, 0: these tiny GEMMs do not split over threads);
the tolerance per recipe (absolute loss) is four times that and at least 5e-4 (1.4e-4 relative to
a loss near 3.7, room for another CPU's summation order), and
``test_golden_curves_separate_recipes`` checks that it stays below the differences between recipes,
so a recipe whose numerics silently turn into another's fails.
"""

import json
from pathlib import Path

import pytest

from lowbit.report import compare, make_study

GOLDEN = Path(__file__).parents[1] / "golden" / "parity_tiny.json"
DATA = json.loads(GOLDEN.read_text())
TOLERANCE = DATA["tolerance"]  # per recipe, absolute loss


@pytest.fixture(scope="module")
def rerun(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(DATA["threads"])
    study = make_study(
        ",".join(DATA["curves"]),
        DATA["settings"],
        seeds=[DATA["seed"]],
        out=tmp_path_factory.mktemp("golden") / "study",
    )
    yield compare(study, plots=False, log=lambda line: None).results
    torch.set_num_threads(threads)


@pytest.mark.parametrize("recipe", list(DATA["curves"]))
def test_loss_curve_matches_golden(rerun, recipe):
    golden = DATA["curves"][recipe]["train"]
    now = [loss for _, loss in rerun["recipes"][recipe]["curves"]["train"]]
    assert len(now) == len(golden) == DATA["settings"]["steps"]
    drift = max(abs(a - b) for a, b in zip(now, golden))
    assert drift <= TOLERANCE[recipe], (
        f"{recipe}: training loss drifted {drift:.2e} from the golden curve (tolerance "
        f"{TOLERANCE[recipe]:.1e}); if the change is intended, rerun: {DATA['regenerate']}"
    )


def test_golden_curves_separate_recipes():
    """The tolerance can catch a recipe turning into another: every pair of stored curves differs
    by more than either recipe's tolerance at some step."""
    curves = DATA["curves"]
    names = list(curves)
    for name in names:
        assert 2 * DATA["reorder_max_abs"][name] <= TOLERANCE[name]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            gap = max(abs(x - y) for x, y in zip(curves[a]["train"], curves[b]["train"]))
            assert gap > max(TOLERANCE[a], TOLERANCE[b]), (a, b, gap)
