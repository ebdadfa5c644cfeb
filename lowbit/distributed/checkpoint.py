"""Checkpoints of multi-process runs through `torch.distributed.checkpoint` (DCP).

A checkpoint is the folder ``<run>/checkpoints/step-NNNNNNN.dcp``: the model, the optimizer states
and any master weights as DCP items (each rank writes its shards; FQN keys), plus ``lowbit.pt``
(rank 0: step, loss-scaler and amax-history state, data position, config, every rank's RNG).
DCP reshards on load, so a run saved with N processes resumes with any M (DDP or FSDP). Written
into a hidden ``.step-NNNNNNN.dcp.tmp`` folder and renamed into place by rank 0 once complete, so a
crash leaves the previous checkpoints intact.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch

from lowbit.train import checkpoint as run_checkpoint

EXTRA = "lowbit.pt"


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(strict=True)


@contextlib.contextmanager
def _creating_optimizer_states(trainer):
    """Within: DCP may create the optimizer's states (``_init_optim_state``: a step of the
    optimizer itself on zero gradients at learning rate 0), from fp32 stand-ins for 16-bit
    parameters (`LowPrecisionUpdate.fp32_params`). That step is the checkpoint's, which changes
    no weight, so it runs as the precision's own: the precision refuses a wrapped optimizer's own
    step under loss scaling, 16-bit parameters or delayed scaling, which stopped every resume of
    those recipes ("AdamW.step() ... outside precision.step()")."""
    precision = trainer.precision
    with precision.update.fp32_params(trainer.optimizer), precision.own_steps():
        yield


def _model_and_optimizer(trainer) -> tuple[dict, dict]:
    """The model's and the optimizer's DCP state dicts; the optimizer's states are created first
    where it has none yet (`_creating_optimizer_states`)."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state, get_state_dict

    if not trainer.optimizer.state:  # stepped, it has them: no fp32 copies to make for nothing
        # DCP creates none where a gradient exists, and DDP's are kept, zeroed, between steps
        # (`Ranks.zero_grad`): kept, a run whose every step overflowed would save no optimizer
        # states, and its resume be refused ("Missing key in checkpoint state_dict"). Given back
        # after: DDP's are views of its buckets (`lowbit.distributed.ddp.grads_as_bucket_views`),
        # and a resumed run's first micro-batch under ``no_sync`` made a copy beside them.
        kept = [(p, p.grad) for p in trainer.model.parameters()]
        trainer.optimizer.zero_grad(set_to_none=True)
        with _creating_optimizer_states(trainer):
            _init_optim_state(trainer.optimizer)
        for p, grad in kept:
            p.grad = grad
    return get_state_dict(trainer.model, trainer.optimizer, options=_options())


def _template(trainer) -> dict:
    model_sd, optim_sd = _model_and_optimizer(trainer)
    return {"model": model_sd, "optimizer": optim_sd}


def _update_items(update: dict) -> dict:
    """Master weights / Kahan buffers (param index -> tensor) as flat DCP items."""
    return {f"update.{kind}.{i}": t for kind, d in update.items() for i, t in d.items()}


def save(trainer) -> Path:
    import torch.distributed.checkpoint as dcp

    ranks, c, step = trainer.dist, trainer.config, trainer.step_idx
    final = run_checkpoint.path_for(c.out, step, kind="dcp")
    tmp = final.with_name(f".{final.name}.tmp")
    if ranks.is_main:
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(".*.tmp"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
    ranks.barrier()
    # False while every step so far was skipped (loss scaling): the optimizer has no states yet
    stepped = bool(trainer.optimizer.state)
    model_sd, optim_sd = _model_and_optimizer(trainer)
    precision = trainer.precision.state_dict()
    update = precision.pop("update")
    with _writing(tmp, ranks.is_main):
        items = {"model": model_sd, "optimizer": optim_sd, **_update_items(update)}
        dcp.save(items, storage_writer=_writer(tmp))
    if not stepped:  # created to be saved: dropped, as one process has none before its first step
        trainer.optimizer.state.clear()
    random = _gather_random_states(ranks, precision.get("rng"))
    if ranks.is_main:
        extra = trainer.state_dict(model=False)
        extra["precision"] = precision
        extra["rank_random_states"] = random
        extra["world_size"] = ranks.world_size
        extra["strategy"] = ranks.strategy
        extra["optimizer_stepped"] = stepped
        with _writing(tmp, ranks.is_main), open(tmp / EXTRA, "wb") as f:
            torch.save(extra, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        run_checkpoint._fsync_dir(final.parent)
        for old in run_checkpoint.list_checkpoints(c.out)[: -c.keep_last]:
            run_checkpoint.remove(old)
    ranks.barrier()
    return final


def _writer(path: Path):
    """DCP's file writer for ``path``, whose failed write raises the `OSError` that says why.
    torch's zip writer raises "unexpected pos" in its place (`run_checkpoint.write_error`), and
    DCP pickles each rank's error to the others, which drops the OSError that the RuntimeError
    held: no rank could tell a full disk from a bug."""
    from torch.distributed.checkpoint import FileSystemWriter

    class Writer(FileSystemWriter):
        def write_data(self, plan, planner):
            try:
                return super().write_data(plan, planner)
            except RuntimeError as error:
                if (refused := run_checkpoint.write_error(error)) is not None:
                    raise refused from None
                raise

    return Writer(path)


@contextlib.contextmanager
def _writing(tmp: Path, main: bool):
    """Within: a checkpoint write that fails raises the `OSError` that says why, for the trainer
    to report as a run not written (`RunNotWritten`: which run, what is kept, how to go on), and
    rank 0 removes the partial folder ``tmp``. DCP wraps every rank's error in a
    `CheckpointException`, a `BaseException`: a full disk printed each rank's traceback and
    `rank 1 failed: OSError: [Errno 28] No space left on device`, and left the partial shards
    filling the disk. A failed `dcp.save` fails on every rank alike once all have written (it
    gathers their results), so no rank writes into ``tmp`` as rank 0 removes it."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except (Exception, CheckpointException) as error:  # not a Ctrl-C: the others may still write
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        failures = error.failures.values() if isinstance(error, CheckpointException) else ()
        causes = [error, *(failure[0] for failure in failures)]
        refused = next((e for e in map(run_checkpoint.write_error, causes) if e is not None), None)
        if refused is not None:
            raise refused from None
        raise


def _gather_random_states(ranks, precision_rng: dict | None) -> list | None:
    """Every rank's generator states, on rank 0 (None on the others): the stream the ranks share
    and each rank's own forward stream (`RankRandom`: dropout, the stochastic rounding of its
    forward operands), which parts from the others' at the first step; restored from rank 0's
    alone, a resumed run drew other bits on rank 1 than the uninterrupted run."""
    import torch.distributed as dist

    from lowbit.train.trainer import rng_state

    gathered = [None] * ranks.world_size if ranks.is_main else None
    own = ranks.random.state if ranks.random is not None else None  # its forwards' (dropout)
    dist.gather_object(
        {"rng": rng_state(), "precision": precision_rng, "forward": own}, gathered, dst=0
    )
    return gathered


def _own_random_state(extra: dict, rank: int, world_size: int) -> dict:
    """``extra`` with this rank's generator states where the run is resumed by as many ranks as
    saved it (rank r continues rank r's streams, its forwards' own under ``forward``); resharded
    (another world size, no stream to continue per rank), or saved before the ranks' states were
    kept, every rank takes rank 0's (and derives its forwards' anew, `RankRandom.load`)."""
    saved = extra.get("rank_random_states")
    if saved is None or len(saved) != world_size:
        return extra
    own = saved[rank]
    precision = {key: value for key, value in extra["precision"].items() if key != "rng"}
    if own["precision"] is not None:
        precision["rng"] = own["precision"]
    return {**extra, "rng": own["rng"], "precision": precision, "forward": own.get("forward")}


@contextlib.contextmanager
def _reading(path):
    """Within: a checkpoint folder that cannot be read (a torn or missing shard file, a missing
    ``.metadata``) is a `UsageError` naming it and which checkpoint to use instead, as for a
    one-process checkpoint (`lowbit.train.checkpoint.unreadable`), not DCP's traceback (an
    ``EOFError`` inside a ``CheckpointException`` of every rank's traceback)."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except (OSError, EOFError, pickle.UnpicklingError, CheckpointException) as error:
        cause = error
        if isinstance(error, CheckpointException) and error.failures:
            cause = next(iter(error.failures.values()))[0]  # (exception, stack) of the first rank
        if not isinstance(cause, (OSError, EOFError, pickle.UnpicklingError)):
            raise  # not the files: a bug or a state that does not fit keeps its traceback
        problem = " ".join(str(cause).split())
        problem = f"{type(cause).__name__}: {problem}" if problem else type(cause).__name__
        raise run_checkpoint.unreadable(Path(path), problem) from None


def read(path) -> dict:
    """The rank-0 part (``lowbit.pt``) of a DCP checkpoint folder, once its shard files are
    checked (`check_shards`)."""
    check_shards(path)
    return run_checkpoint.read_file(Path(path) / EXTRA, name=path)


def check_shards(path) -> None:
    """Refuse (`_reading`) a checkpoint folder whose ``.metadata`` does not read, or whose shard
    file is missing or shorter than the bytes its ``.metadata`` lists there (a copy or a write cut
    short), from the metadata and each shard's size: a resume reads it before the model is built
    (`lowbit.train.checkpoint.read_settings`; the `--nproc` launcher before starting its ranks),
    not as each rank loads it (DCP's "EOFError"). A byte changed in a shard is not seen: DCP
    writes no checksum."""
    import torch.distributed.checkpoint as dcp

    with _reading(path):
        try:
            metadata = dcp.FileSystemReader(str(path)).read_metadata()
        except (EOFError, pickle.UnpicklingError) as error:  # it said "pickle data was truncated"
            raise EOFError(f".metadata cut short or not DCP's ({error})") from None
        storage = metadata.storage_data or {}
        ends: dict[str, int] = {}
        for info in storage.values():
            end = info.offset + info.length
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), end)
        for name, end in sorted(ends.items()):
            size = (Path(path) / name).stat().st_size
            if size < end:
                raise EOFError(f"{name} holds {size} of the {end} bytes its .metadata lists")


def _saved_tensors_as_tensors(state, metadata: dict, prefix: str = "") -> None:
    """Make each number of the load template ``state`` that the checkpoint saved as a tensor a
    tensor of the saved dtype and shape, for DCP to read into. A param group's lr is one: lowbit
    kept torchao's 0-dim tensor lr until session 30, and a float lr now (the optimizer's
    ``load_state_dict`` turns a loaded tensor back into a float), and DCP refused the older
    checkpoints ("expected BytesStorageMetadata but found TensorStorageMetadata")."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    items = state.items() if isinstance(state, dict) else enumerate(state)
    for key, value in list(items):
        name = f"{prefix}{key}"
        if isinstance(value, dict | list):
            _saved_tensors_as_tensors(value, metadata, f"{name}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            saved = metadata.get(name)
            if isinstance(saved, TensorStorageMetadata):
                state[key] = torch.full(saved.size, value, dtype=saved.properties.dtype)


def load(trainer, path, extra: dict) -> None:
    """Load a DCP checkpoint into a trainer of this process group (any world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from lowbit.precision.update import optimizer_params

    state = _template(trainer)
    params = optimizer_params(trainer.optimizer)
    with _reading(path):
        keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    _saved_tensors_as_tensors(state, keys)
    update: dict = {"masters": {}, "compensation": {}}
    for key in keys:
        if key.startswith("update."):
            _, kind, index = key.split(".")
            p = params[int(index)].detach()
            state[key] = p.float().clone() if kind == "masters" else p.clone()
    with _reading(path):
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(
        trainer.model,
        trainer.optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=_options(),
    )
    for key, value in state.items():
        if key.startswith("update."):
            _, kind, index = key.split(".")
            update[kind][int(index)] = value
    extra = _own_random_state(extra, trainer.dist.rank, trainer.dist.world_size)
    trainer.load_state_dict({**extra, "precision": {**extra["precision"], "update": update}})
    if trainer.dist.random is not None:  # after the shared stream, which it may derive from
        trainer.dist.random.load(extra.get("forward"))
    if not extra.get("optimizer_stepped", True):  # saved before any step: DCP's zero states
        trainer.optimizer.state.clear()


def load_full(path) -> dict:
    """A DCP checkpoint as one process's plain state (``model`` of full tensors, ``precision``,
    ``step``...), for `lowbit eval` and `lowbit generate`.

    The optimizer states are left out: nothing that reads a run in one process steps it, and
    torchao's quantized states (``--optimizer-state 8bit|4bit|fp8``) are pickled objects that the
    single-process reader's ``weights_only`` unpickling refuses."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    extra = read(path)
    with _reading(path), warnings.catch_warnings():
        stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        keys = {"model", *(key for key in stored if key.startswith("update."))}
        # "assuming the intent is to load in a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        items = _load_state_dict_from_keys(keys, checkpoint_id=str(path))
    update: dict = {"masters": {}, "compensation": {}}
    for key, value in items.items():
        if key.startswith("update."):
            _, kind, index = key.split(".")
            update[kind][int(index)] = value
    return {
        **extra,
        "model": items["model"],
        "precision": {**extra["precision"], "update": update},
    }
