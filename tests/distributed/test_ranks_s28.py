"""Session 28: the ranks of a multi-process run draw dropout masks of their own, while their
stochastic rounding of the update (replicated under DDP) and a one-rank run's draws stay as
they were."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lowbit.train import TrainConfig
from tests.distributed.helpers import TINY, on_ranks
from tests.once import folder_once_per_session


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory) -> Path:
    """A two-block GPT-2 that drops half of its embeddings and of every residual branch, saved
    once per session."""
    return folder_once_per_session(tmp_path_factory, "ranks-s28-gpt2", _save_dropout_model)


def _save_dropout_model(folder) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=257, n_positions=64, resid_pdrop=0.5,
        embd_pdrop=0.5, attn_pdrop=0.0,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(folder / "gpt2")
    return folder / "gpt2"


def config(out, model, **kw) -> TrainConfig:
    """bf16-pure-sr: 16-bit parameters that every DDP rank rounds stochastically into its replica."""
    settings = {**TINY, "recipe": "bf16-pure-sr", "steps": 3, "save_interval": 2, "keep_last": 5}
    return TrainConfig(model=str(model), out=str(out), **{**settings, **kw})


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def _ranks_run(rank, world, out, model):
    """This rank's dropout masks of its first step, its parameters after 3 steps straight
    through and after a resume from step 2 by the same two ranks."""
    import torch.distributed as dist

    from lowbit.distributed import Ranks
    from lowbit.train import Trainer

    Trainer.sample = False  # no sample text at the end: seconds, and no part of the check
    cpu = torch.device("cpu")
    run = config(Path(out) / "straight", model, strategy="ddp", nproc=world)
    straight = Trainer(run, quiet=True, dist=Ranks("ddp", cpu))
    masks = []

    def record(module, args, output):
        if module.training and straight.step_idx == 0:  # the first step's (not evaluation's)
            masks.append((output == 0) & (args[0] != 0))

    for module in straight.model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:  # not attention's (p = 0)
            module.register_forward_hook(record)
    straight.fit()
    if rank == 0:  # the run as a stop after step 2 left it
        shutil.copytree(Path(out) / "straight", Path(out) / "resumed")
        shutil.rmtree(Path(out) / "resumed" / "checkpoints" / "step-0000003.dcp")
    dist.barrier()
    run = config(Path(out) / "resumed", model, strategy="ddp", nproc=world)
    resumed = Trainer(run, quiet=True, dist=Ranks("ddp", cpu), resume=True)
    resumed.fit(resume=True)
    return masks, _params(straight.model), _params(resumed.model)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, dropout_model) -> list:
    """What each of two ranks returned, launched once per session."""

    def make(out):
        return on_ranks(_ranks_run, 2, timeout=120, out=str(out), model=str(dropout_model))

    return folder_once_per_session(tmp_path_factory, "ranks-s28", make)


def test_each_rank_drops_units_of_its_own(two_ranks):
    """Every rank seeded torch alike and drew the same dropout mask for its own rows: noise
    correlated across the ranks, which a data-parallel run is not meant to have."""
    (masks0, _, _), (masks1, _, _) = two_ranks
    assert masks0 and len(masks0) == len(masks1)
    for mask0, mask1 in zip(masks0, masks1, strict=True):
        assert 0.3 < mask0.float().mean() < 0.7  # p = 0.5: a dropout mask, not zeros of the input
        assert not torch.equal(mask0, mask1)


def test_replicas_stay_identical_and_resume_bit_identically(two_ranks):
    """The ranks' stochastic rounding of the update (the same averaged gradient into each
    replica) still draws alike, and a resumed run continues each rank's forward stream."""
    (_, straight0, resumed0), (_, straight1, resumed1) = two_ranks
    assert torch.equal(straight0, straight1)
    assert torch.equal(straight0, resumed0) and torch.equal(straight1, resumed1)


def _masks(trainer, steps: int) -> list[torch.Tensor]:
    """The dropout masks of ``steps`` training steps."""
    masks = []

    def record(module, args, output):
        masks.append((output == 0) & (args[0] != 0))

    for module in trainer.model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.register_forward_hook(record)
    for _ in range(steps):
        trainer.step()
    return masks


def test_one_rank_draws_what_one_process_draws(dropout_model, tmp_path):
    """A one-process group (``--strategy ddp``, one rank) draws the masks of one process: the one
    stream, as before. Masks, not losses: DDP's one-rank arithmetic differs in the last bits from
    the third step on, and one process's second step ends with the memory report's own forward,
    whose masks come after the step's (`Trainer._memory_report`)."""
    from lowbit.distributed import SINGLE
    from lowbit.distributed.context import join
    from lowbit.train import Trainer

    one = Trainer(config(tmp_path / "one", dropout_model, recipe="fp32"), True, dist=SINGLE)
    alone = _masks(one, 2)
    ranks = join("ddp", torch.device("cpu"))
    try:
        run = config(tmp_path / "rank", dropout_model, recipe="fp32", strategy="ddp", nproc=1)
        grouped = _masks(Trainer(run, True, dist=ranks), 2)
    finally:
        ranks.close()
    assert len(grouped) == 10 and len(alone) == 15  # 5 dropouts per forward
    assert all(map(torch.equal, alone[:10], grouped))
