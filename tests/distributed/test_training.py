"""Two gloo ranks on the CPU: DDP and FSDP2 follow a one-process run with the same global batch,
ranks stay identical, scales and overflow decisions are agreed, checkpoints reshard 2 <-> 1."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace

import pytest
import torch

from lowbit.distributed import SINGLE
from lowbit.train import TrainConfig, train
from tests.distributed.helpers import TINY, on_ranks
from tests.once import once_per_session

STEPS = 4
RECIPES = ("fp32", "bf16-mixed", "fp8-tensorwise", "mxfp8", "bf16-low", "bf16-pure-sr")
# 16-bit parameters: bf16-low (fp32 masters) with both; bf16-pure-sr (no masters, stochastic
# rounding of each rank's shard) with FSDP
STRATEGY_RECIPES = {"ddp": RECIPES[:5], "fsdp": RECIPES}
# the recipe of the run stopped at step 2 by two processes and resumed by one: FSDP's in bf16-low
# has sharded parameters, fp32 master weights and optimizer states to reshard
STOPPED = {"ddp": "fp32", "fsdp": "bf16-low"}
# Loss of each step vs one process, relative. fp32 differs only by the order of additions (the
# gradient all-reduce, the per-rank GEMMs); bf16 rounding amplifies that order into bf16 steps.
RTOL = {
    "ddp": {
        "fp32": 1e-5,
        "bf16-mixed": 2e-3,
        "fp8-tensorwise": 2e-3,
        "mxfp8": 2e-3,
        "bf16-low": 5e-3,
    },
    # FSDP all-gathers fp8/MX weights in bf16 (MixedPrecisionPolicy param_dtype) and the layer
    # quantizes that, one more rounding than one process does (measured 4.5e-3 for mxfp8; 4e-4
    # when the all-gather is fp32). bf16-pure-sr: each shard draws its rounding from a generator of
    # its own, so the random bits differ from one process's (measured 2.7e-4).
    "fsdp": {
        "fp32": 1e-5,
        "bf16-mixed": 2e-3,
        "fp8-tensorwise": 1e-2,
        "mxfp8": 1e-2,
        "bf16-low": 5e-3,
        "bf16-pure-sr": 5e-3,
    },
}
# warmup 0 and min_lr == lr: a constant lr, so a run stopped at step 2 and resumed to step 4 takes
# the steps of a run to step 4.
CONSTANT_LR = {"warmup_steps": 0, "min_lr": TINY["lr"]}


def config(out, recipe="fp32", steps=STEPS, **kw) -> TrainConfig:
    return TrainConfig(recipe=recipe, steps=steps, out=str(out), **TINY, **CONSTANT_LR, **kw)


def flat_params(model) -> torch.Tensor:
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return torch.cat([p.detach().float().reshape(-1) for p in full])


def fit(config, ranks, resume=False):
    """(per-step train losses, trainer) of a run on this process group."""
    from lowbit.train import Trainer

    losses = []
    trainer = Trainer(config, quiet=True, dist=ranks, resume=resume)
    trainer.sample = False  # the closing sample text: seconds a run, and no part of the checks
    trainer.fit(
        resume=resume, overwrite=not resume, on_step=lambda t: losses.append(t.recent_losses[-1])
    )
    return losses, trainer


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def training_state(trainer) -> dict:
    """Everything a step depends on, gathered (full tensors), and this rank's share of it."""
    from lowbit.precision.update import local_values, optimizer_params

    masters = list(trainer.precision.state_dict()["update"].get("masters", {}).values())
    params = optimizer_params(trainer.optimizer)
    states = [trainer.optimizer.state[p] for p in params]
    return {
        "params": [full(p.detach()) for p in params],
        "masters": [full(m) for m in masters],
        "optimizer": [full(s[k]) for s in states for k in sorted(s) if k != "step"],
        "dtypes": {str(p.dtype) for p in params},
        "values": sum(p.numel() for p in params),
        "local_values": sum(local_values(p).numel() for p in params),
        "local_master_values": sum(local_values(m).numel() for m in masters),
    }


def histories(model) -> dict:
    from lowbit.nn.convert import lowbit_layers

    return {
        f"{layer}:{name}": h.history.clone()
        for layer, module in lowbit_layers(model).items()
        for name, h in module.lowbit_state.histories.items()
    }


def scales(recipe, rank, world, ranks, together) -> dict:
    """``operand -> (scale, tensor scale)`` of every quantized operand in one forward and backward
    of a three-layer MLP on this rank's 32 rows of a global batch (three: nvfp4 keeps the first and
    last layer of a model without blocks, so its middle layer is the NVFP4 one)."""
    import contextlib

    from lowbit.nn.convert import lowbit_layers
    from lowbit.precision import Precision

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 64),
        torch.nn.GELU(),
        torch.nn.Linear(64, 64),
        torch.nn.GELU(),
        torch.nn.Linear(64, 32),
    )
    precision = Precision(recipe)
    precision.convert(model)
    seen = {}

    def observe(layer, operand, x, q):
        tensor_scale = None if q.tensor_scale is None else q.tensor_scale.clone()
        seen[f"{layer}:{operand}"] = (q.scale.clone(), tensor_scale)

    for name, layer in lowbit_layers(model).items():
        layer.lowbit_state.observer = lambda *args, name=name: observe(name, *args)
    rows = torch.randn(world * 32, 64, generator=torch.Generator().manual_seed(1))
    x = rows[rank * 32 : (rank + 1) * 32] * (1 + 3 * rank)  # ranks differ in range
    with contextlib.nullcontext() if together else ranks.alone():
        with precision.autocast():
            loss = model(x).float().square().mean()
        precision.backward(loss)
    assert seen
    return seen


def _on_two_ranks(rank, world, out, resume_from):
    from lowbit.distributed import Ranks
    from lowbit.precision import Precision

    cpu = torch.device("cpu")
    out_dir = __import__("pathlib").Path(out)
    results = {"matrix": {}, "resume": {}}
    for strategy in ("ddp", "fsdp"):
        for recipe in STRATEGY_RECIPES[strategy]:
            cfg = config(out_dir / f"{strategy}-{recipe}", recipe, strategy=strategy, nproc=world)
            losses, trainer = fit(cfg, Ranks(strategy, cpu))
            results["matrix"][strategy, recipe] = (losses, flat_params(trainer.model))
        # stopped at step 2, resumed with one process by the test
        _, trainer = fit(
            config(
                out_dir / f"{strategy}-stopped",
                STOPPED[strategy],
                steps=2,
                strategy=strategy,
                nproc=world,
            ),
            Ranks(strategy, cpu),
        )
        results["saved", strategy] = training_state(trainer)
    # token classification: the ranks' halves of a batch hold different numbers of labelled words
    cfg = config(out_dir / "tagger", task="token-classification", strategy="ddp", nproc=world)
    results["tagger"] = tagger_losses(cfg, Ranks("ddp", cpu))
    # a run saved by one process, resumed here with two
    cfg = replace(config(resume_from, strategy="ddp"), nproc=world)
    results["resume"]["1->2"] = fit(cfg, Ranks("ddp", cpu), resume=True)[0]

    # delayed scaling: the amax histories (the scaling state) of every layer, agreed vs alone
    ranks = Ranks("ddp", cpu)
    _, trainer = fit(
        config(out_dir / "delayed", "fp8-delayed", steps=2, strategy="ddp", nproc=world), ranks
    )
    results["agreed"] = histories(trainer.model)
    with ranks.alone():
        trainer.step()
    results["alone"] = histories(trainer.model)

    # row (fp8-rowwise) and NVFP4 tensor scales, agreed vs alone, on each rank's own rows
    results["scales"] = {
        recipe: {together: scales(recipe, rank, world, ranks, together) for together in (1, 0)}
        for recipe in ("fp8-rowwise", "nvfp4")
    }

    # the loss scaler's decision: rank 1 alone overflows
    decisions = []
    for together in (True, False):
        model = torch.nn.Linear(4, 4)
        precision = Precision("fp16-mixed")
        precision.convert(model)
        optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        loss = model(torch.ones(2, 4)).sum() * (math.inf if rank == 1 else 1.0)
        precision.backward(loss)
        with ranks.alone() if not together else __import__("contextlib").nullcontext():
            decisions.append(precision.step(optimizer))
    results["stepped"] = decisions
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One spawn of two ranks runs every multi-process part (spawning costs seconds per rank),
    once per session."""
    return once_per_session(
        tmp_path_factory, "training-two-ranks", lambda: _two_ranks(tmp_path_factory)
    )


def _two_ranks(tmp_path_factory):
    from lowbit.train import Trainer

    out = tmp_path_factory.mktemp("ranks")
    torch.manual_seed(0)
    # one process under --strategy ddp (a group of one), stopped at step 2: resumed with two
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "sample", False)  # no closing sample text (seconds)
        train(config(out / "one-stopped", steps=2, strategy="ddp"), quiet=True)
    return out, on_ranks(
        _on_two_ranks, 2, timeout=400, out=str(out), resume_from=str(out / "one-stopped")
    )


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """Per-step losses of one process with the same global batch, per recipe (once per session)."""
    return once_per_session(
        tmp_path_factory, "training-one-process", lambda: _one_process(tmp_path_factory)
    )


def _one_process(tmp_path_factory) -> dict:
    from lowbit.train import Trainer

    out = tmp_path_factory.mktemp("one")
    curves = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "sample", False)  # no closing sample text (seconds a run)
        for recipe in RECIPES:
            losses = curves[recipe] = []
            train(
                config(out / recipe, recipe),
                quiet=True,
                on_step=lambda t, ls=losses: ls.append(t.recent_losses[-1]),
            )
    return curves


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_loss_curve_matches_one_process_and_ranks_agree(two_ranks, one_process, strategy):
    _, ranks = two_ranks
    gaps = {}
    for recipe in STRATEGY_RECIPES[strategy]:
        losses, params = ranks[0]["matrix"][strategy, recipe]
        single = one_process[recipe]
        assert len(losses) == len(single) == STEPS
        gaps[recipe] = max(abs(a - b) / abs(b) for a, b in zip(losses, single, strict=True))
        assert losses[-1] < losses[0], recipe  # it trains
        # every rank holds the same parameters (FSDP: the gathered full tensors)
        assert torch.equal(params, ranks[1]["matrix"][strategy, recipe][1]), recipe
    print(f"largest relative loss gap to one process, {strategy}: {gaps}")  # for docs (-s)
    assert all(gaps[r] <= RTOL[strategy][r] for r in gaps), gaps


def tagger_losses(cfg, ranks) -> list[float]:
    """The losses of a tagger's first steps with dropout off (ranks and one process draw other
    dropout masks)."""
    from lowbit.train import Trainer

    trainer = Trainer(cfg, quiet=True, dist=ranks)
    trainer.train_model.eval()
    return [trainer.step()["loss"] for _ in range(STEPS)]


def test_token_classification_weighs_ranks_by_their_labelled_words(two_ranks, tmp_path):
    """Each rank's mean loss weighs by its share of the batch's labelled words, so the step is
    one process's step on the whole batch (with equal weights the four steps' losses were off by
    1e-4 to 2e-2)."""
    _, ranks = two_ranks
    single = tagger_losses(config(tmp_path / "tagger", task="token-classification"), SINGLE)
    gaps = [abs(a - b) / b for a, b in zip(ranks[0]["tagger"], single, strict=True)]
    assert max(gaps) <= RTOL["ddp"]["fp32"], gaps


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_saved_by_two_processes_resumes_with_one(two_ranks, strategy, monkeypatch, tmp_path):
    from lowbit.distributed.context import join
    from lowbit.train import Trainer

    monkeypatch.setattr(Trainer, "sample", False)  # no closing sample text (seconds)

    out, ranks = two_ranks
    recipe = STOPPED[strategy]
    stopped = tmp_path / f"{strategy}-stopped"  # a copy: the shared run is read only
    shutil.copytree(out / f"{strategy}-stopped", stopped)
    cfg = replace(config(stopped, recipe, strategy=strategy), nproc=1)
    # loaded by one process: parameters, master weights, optimizer states as the two saved them
    one = join(strategy, torch.device("cpu"))
    try:
        loaded = training_state(fit(replace(cfg, steps=2), one, resume=True)[1])
    finally:
        one.close()
    saved = ranks[0]["saved", strategy]
    for key in ("params", "masters", "optimizer"):
        assert len(loaded[key]) == len(saved[key]), key
        assert all(map(torch.equal, loaded[key], saved[key])), key
    assert loaded["dtypes"] == saved["dtypes"]
    # and training continues with the losses of the uninterrupted two-process run: the same
    # arithmetic (fp32), or all but the reduction of bf16 gradients (bf16-low: measured 4.7e-5)
    uninterrupted = ranks[0]["matrix"][strategy, recipe][0]
    losses = []
    train(cfg, resume=True, quiet=True, on_step=lambda t: losses.append(t.recent_losses[-1]))
    gap = max(abs(a - b) / abs(b) for a, b in zip(losses, uninterrupted[2:], strict=True))
    print(f"resumed by one vs uninterrupted, {strategy} {recipe}: {gap:.1e}")  # for docs (-s)
    assert losses == pytest.approx(uninterrupted[2:], rel={"fp32": 1e-5, "bf16-low": 1e-3}[recipe])


def test_fsdp_shards_16bit_parameters_and_their_master_weights(two_ranks):
    _, ranks = two_ranks
    shares = [rank["saved", "fsdp"] for rank in ranks]
    assert all(s["dtypes"] == {"torch.bfloat16"} for s in shares)
    total = shares[0]["values"]
    for key in ("local_values", "local_master_values"):  # every value on exactly one rank
        assert sum(s[key] for s in shares) == total, key
        assert all(0 < s[key] < total for s in shares), key


def test_saved_by_one_process_resumes_with_two(two_ranks):
    _, ranks = two_ranks
    uninterrupted = ranks[0]["matrix"]["ddp", "fp32"][0]
    for rank in ranks:
        assert rank["resume"]["1->2"] == pytest.approx(uninterrupted[2:], rel=1e-5)


def test_every_rank_scales_with_the_same_amax(two_ranks):
    _, (rank0, rank1) = two_ranks
    agreed0, agreed1 = rank0["agreed"], rank1["agreed"]
    assert agreed0 and agreed0.keys() == agreed1.keys()
    for name in agreed0:
        assert torch.equal(agreed0[name], agreed1[name]), name
        assert agreed0[name][:2].gt(0).all(), name  # two steps were recorded
    # the same step without agreement: the amax of activations and gradients (each rank's own
    # rows) differs across ranks, weights (identical under DDP) do not
    alone0, alone1 = rank0["alone"], rank1["alone"]
    batch = [n for n in alone0 if not n.endswith(".w")]
    same = [n for n in batch if torch.equal(alone0[n][0], alone1[n][0])]
    assert batch and len(same) < len(batch) / 4, same
    assert all(torch.equal(alone0[n], alone1[n]) for n in alone0 if n.endswith(".w"))


def test_every_rank_uses_the_same_row_and_nvfp4_tensor_scales(two_ranks):
    """fp8-rowwise: the weight gradient's operands are quantized along the tokens, so each row
    spans both ranks' tokens and its scale is agreed; the forward's per-token rows are each one
    rank's own. NVFP4: the per-tensor scale of every activation and gradient is agreed."""
    _, (rank0, rank1) = two_ranks

    def differing(recipe, together, pick):
        a, b = rank0["scales"][recipe][together], rank1["scales"][recipe][together]
        assert a.keys() == b.keys()
        return [n for n in a if not torch.equal(pick(a[n]), pick(b[n]))]

    def batch(name):
        return not name.endswith(".w")

    rowwise = rank0["scales"]["fp8-rowwise"][1]
    across = [n for n in rowwise if ":grad_weight." in n]
    assert len(across) == 6  # two operands in each of the three layers
    assert not set(across) & set(differing("fp8-rowwise", 1, lambda s: s[0]))
    assert set(across) <= set(differing("fp8-rowwise", 0, lambda s: s[0]))  # alone: they differ
    # per-token rows (forward.x) stay each rank's own, agreed or not
    assert "0:forward.x" in differing("fp8-rowwise", 1, lambda s: s[0])

    nvfp4 = [n for n in rank0["scales"]["nvfp4"][1] if batch(n)]
    assert len(nvfp4) == 4  # the middle layer's (nvfp4 keeps the first and the last)
    assert not set(nvfp4) & set(differing("nvfp4", 1, lambda s: s[1]))
    assert set(nvfp4) == set(differing("nvfp4", 0, lambda s: s[1]))


def test_overflow_on_one_rank_skips_the_step_on_every_rank(two_ranks):
    _, (rank0, rank1) = two_ranks
    assert rank0["stepped"][0] is False and rank1["stepped"][0] is False  # decided together
    assert rank0["stepped"][1] is True and rank1["stepped"][1] is False  # each rank alone
