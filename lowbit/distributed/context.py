"""What a rank knows about the job: `SingleProcess` (every hook a no-op) and `Ranks` (a process
group, DDP or FSDP2), the objects the trainer calls so that its loop has no distributed branches."""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import signal
import socket
import sys
import threading
import warnings

import torch

from lowbit.errors import UsageError
from lowbit.nn.operand import ScaleAgreement, scale_agreement, set_scale_agreement

STRATEGIES = ("ddp", "fsdp")
# A rank waits this long for the others in a collective before failing (a crashed rank is also
# caught by the launcher, which stops the rest at once); LOWBIT_DIST_TIMEOUT overrides it.
DEFAULT_TIMEOUT_S = 600


# The `--nproc` launcher's request to its ranks to stop as after a first Ctrl-C (a SIGINT sent to
# the launcher alone, not to the terminal's whole process group, reaches no rank).
STOP_SIGNAL = getattr(signal, "SIGUSR1", None)


@contextlib.contextmanager
def signals_handled(handler, *signums):
    """Within: ``handler`` handles ``signums``; their previous handlers afterwards. Only the main
    thread may set handlers: elsewhere (a caller's worker thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def progress_bars_lock_threads_only() -> None:
    """tqdm's bars lock with a thread lock in this process, not its default multiprocessing one.
    That one is a named semaphore, which a process killed (SIGKILL, the out-of-memory killer, or
    the SIGTERM that stops the others after one failed) never unlinks: the resource tracker then
    printed "There appear to be 2 leaked semaphore objects to clean up at shutdown" after the
    one-line error. For the `--nproc` launcher's ranks (only rank 0 draws a bar) and the workers
    of `lowbit compare --jobs` (quiet): no lock across processes is needed."""
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def collective_timeout() -> datetime.timedelta:
    """How long a rank waits for the others in any collective (``LOWBIT_DIST_TIMEOUT``, seconds).
    A value that is not a positive number of seconds is a `UsageError` naming the variable: every
    rank failed with ``float``'s "could not convert string to float: '10m'", which named neither
    the variable nor its unit, and with 0 or less with the rendezvous's "client socket has timed
    out after 0ms"."""
    value = os.environ.get("LOWBIT_DIST_TIMEOUT")
    if value is None:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise UsageError(
            f"LOWBIT_DIST_TIMEOUT={value} is not a positive number of seconds; fix: set it to "
            f"seconds (e.g. LOWBIT_DIST_TIMEOUT=1800), or unset it (default {DEFAULT_TIMEOUT_S})"
        )
    return datetime.timedelta(seconds=seconds)


class RankFailed(RuntimeError):
    """A rank of a multi-process run failed; the others were stopped."""


def local_cuda_device() -> torch.device:
    """The GPU of this process's local rank (``LOCAL_RANK``, 0 for a process of its own): the one
    a rank trains on, and the one the memory pre-flight checks."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def torchrun_env() -> bool:
    """True inside a process started by torchrun (or the `--nproc` launcher)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requested_port() -> int | None:
    """The port ``MASTER_PORT`` asks the `--nproc` launcher for; None where it is unset or empty
    (``export MASTER_PORT=``), which picks a free one. Anything but a port number is a
    `UsageError` naming the variable: the launcher failed with ``int``'s traceback ("invalid
    literal for int() with base 10: 'abc'") or the socket's ("port must be 0-65535")."""
    value = os.environ.get("MASTER_PORT", "").strip()
    if not value:
        return None
    port = int(value) if value.isdigit() else 0
    if not 0 < port < 65536:
        raise UsageError(
            f"MASTER_PORT={value} is not a port number (1-65535); fix: set it to a free port, "
            "or unset it to pick one"
        )
    return port


def check_port(port: int, host: str = "127.0.0.1") -> None:
    """A `UsageError` when ``port`` is taken (another run, or a stale rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            raise UsageError(
                f"port {port} is in use (another run?); fix: unset MASTER_PORT to pick a free port, "
                "or set it to a free one"
            ) from None


class SingleProcess:
    """One process, no strategy: every hook is the identity."""

    rank, world_size, local_rank, strategy = 0, 1, 0, None
    is_main = True
    distributed = False
    random = None  # one process draws everything from torch's global generators (`RankRandom`)

    def device(self, device: torch.device) -> torch.device:
        return device

    def shard_batches(self, batches):
        return batches

    def wrap(self, model, precision, sum_gradients: bool = False):
        """(model for training forward passes, model for everything else)."""
        return model, model

    def accumulating(self, model, more: bool):
        return contextlib.nullcontext()

    def zero_grad(self, optimizer) -> None:
        """Clear the gradients of a step taken (or given up); dropped, their memory freed."""
        optimizer.zero_grad(set_to_none=True)

    def alone(self):
        """Within: this rank computes by itself (no scale agreement with the others)."""
        return contextlib.nullcontext()

    def check_same_data(self, fingerprint: dict | None) -> None:
        """Refuse ranks that read other data (`Ranks`); one process has nothing to compare."""

    def mean(self, value: float) -> float:
        return value

    def total(self, value: float) -> float:
        return value

    def any(self, flag: bool) -> bool:
        return flag

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


SINGLE = SingleProcess()


class AllReduceAgreement(ScaleAgreement):
    """Scale agreement over a process group of its own (so its small all-reduces never interleave
    with DDP's or FSDP's gradient collectives on the default group)."""

    active = True

    def __init__(self, group, device: torch.device):
        self.group = group
        self.device = device
        self.calls = 0
        self.bytes = 0  # amax payload handed to all-reduces (per rank)

    def amax(self, amax: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = amax.detach().float().reshape(-1).to(self.device, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
        self.calls += 1
        self.bytes += out.numel() * out.element_size()
        return out.reshape(amax.shape).to(amax.device)

    def all_finite(self, finite: bool) -> bool:
        import torch.distributed as dist

        flag = torch.tensor([0.0 if finite else 1.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return flag.item() == 0


class RankRandom:
    """This rank's own generator states, which its training forwards draw from (dropout masks,
    stochastic rounding of forward operands); everything else draws from the stream that every
    rank shares, seeded alike (``--seed``).

    Seeded alike, every rank drew the same dropout mask for its own rows, correlated noise that
    a data-parallel run is not meant to have. Reseeding the whole generator per rank instead
    would part the ranks' stochastic rounding of the update: under DDP each rank rounds the same
    averaged gradient into its replica, so their draws must stay the same or the replicas drift
    apart (the rounding seeds come from torch's global CPU generator, `counter_rng.draw_seed`).
    So the forward alone swaps this rank's states into torch's global generators and back (the
    backward's draws, a recomputed checkpointed forward restoring its own, stay shared).
    A rank's states derive from the shared stream and the rank (`derive`); the model is built
    from seeds of its own and DDP broadcasts it, so its initialization does not depend on them."""

    def __init__(self, rank: int, device: torch.device):
        self.rank = rank
        self.device = device
        self.state = self.derive()  # outside a forward this rank's; inside, the shared stream's
        self.inside = False

    def derive(self) -> dict:
        """States seeded from the shared CPU generator's next draw (read from a copy: the shared
        stream does not move) and the rank, as a fresh run and a resharded resume start."""
        from lowbit.formats.counter_rng import draw_seed, seeded_generator

        shared = torch.Generator()
        shared.set_state(torch.get_rng_state())
        base = draw_seed(shared)
        state = {"cpu": seeded_generator(base, self.rank).get_state()}
        if self.device.type == "cuda":
            state["cuda"] = seeded_generator(base, self.rank, self.device).get_state()
        return state

    def _swap(self) -> None:
        """Exchange the global generators' states with the held ones."""
        held = {"cpu": torch.get_rng_state()}
        torch.set_rng_state(self.state["cpu"])
        if "cuda" in self.state:
            held["cuda"] = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(self.state["cuda"], self.device)
        self.state = held
        self.inside = not self.inside

    def _enter(self, *_) -> None:
        if not self.inside:
            self._swap()  # this rank's states in, the shared held

    def _leave(self, *_) -> None:
        if self.inside:  # not where an earlier pre-forward hook (FSDP's all-gather) raised
            self._swap()

    def install(self, model) -> None:
        """Draw ``model``'s forwards from this rank's states (always_call: a forward that raised
        gives the shared stream back too)."""
        model.register_forward_pre_hook(self._enter)
        model.register_forward_hook(self._leave, always_call=True)

    def load(self, state: dict | None) -> None:
        """Continue from a checkpoint's states of this rank. Derived anew from the restored shared
        stream (so that the resumed steps do not repeat the first steps' masks) where there are
        none (saved by another number of ranks, or before ranks had their own) or they are of
        another device (a CPU run resumed on a GPU: no CUDA state, the masks drawn there would
        be every rank's again)."""
        fits = state is not None and ("cuda" in state) == (self.device.type == "cuda")
        self.state = state if fits else self.derive()


_warned_alone = False  # `warn_if_ranks_act_alone` warned in this process


def warn_if_ranks_act_alone(what_differs, stacklevel: int = 2) -> None:
    """Once per process, on rank 0: warn that a `Precision` steps in a process group of several
    ranks where no `Ranks` installed their agreement, if that changes what it computes.
    ``what_differs()`` says how ("" where nothing does: fp32, bf16-mixed, block scales only). A
    user's own DDP/FSDP2 loop then has each rank take its own finite check and its own scales: an
    overflow in one rank's FSDP gradient shard skips the step and backs off the loss scale on that
    rank alone, and the ranks drift apart without an error; tensorwise scales cover one rank's
    part of the batch, not the global batch a single process would scale. Installing the
    agreement here instead would need a process group of its own, whose creation is a collective
    every rank must join: a `Precision` built on one rank (rank 0 evaluating) would hang, and
    ranks that train models of their own would wait on each other's amaxes. No collective runs
    here (only the group's size and this rank are read), so a one-process program's results stay
    the same. ``stacklevel``: the caller's, for the line the warning names (the user's
    ``precision.step``)."""
    global _warned_alone
    import torch.distributed as dist

    if _warned_alone or not dist.is_available() or not dist.is_initialized():
        return
    if scale_agreement().active or dist.get_world_size() == 1:
        return
    differs = what_differs()
    _warned_alone = True  # asked once: the recipe does not change
    if differs and dist.get_rank() == 0:
        warnings.warn(
            f"lowbit: Precision steps in a process group of {dist.get_world_size()} ranks "
            f"without their agreement: {differs}; fix: build "
            "lowbit.distributed.Ranks(strategy, device) on every rank after "
            "init_process_group (ranks training models of their own: ignore this)",
            stacklevel=stacklevel + 1,
        )


class Ranks(SingleProcess):
    """This process's place in a process group, and the strategy's hooks."""

    distributed = True

    def __init__(self, strategy: str, device: torch.device):
        import torch.distributed as dist

        self.strategy = strategy
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.is_main = self.rank == 0
        self._device = device
        self.comm = None  # DDP: byte counts of the gradient all-reduce (ddp.CommStats)
        self.random: RankRandom | None = None  # several ranks: their forwards' own streams
        backend = "gloo" if device.type == "cpu" else None
        # new_group's own default timeout is torch's 30 minutes, not the default group's: an
        # amax all-reduce that a hung rank never joined waited that long
        group = dist.new_group(backend=backend, timeout=collective_timeout())
        self.agreement = AllReduceAgreement(group, device)
        set_scale_agreement(self.agreement)

    def device(self, device: torch.device) -> torch.device:
        return self._device

    def shard_batches(self, batches):
        from lowbit.distributed.data import RankSlice

        return RankSlice(batches, self.rank, self.world_size)

    def wrap(self, model, precision, sum_gradients: bool = False):
        """(the model to train, the model whose state is saved): DDP's or FSDP2's. Their gradient
        reductions average the ranks' gradients, plain DDP's meaning for a loop in which each rank
        backpropagates its own mean loss. ``sum_gradients``: sum them instead (no division by the
        world size), for ranks that each backpropagate their share of the global batch's mean
        loss, their own mean / world size (`lowbit.train.Trainer.step`)."""
        if self.strategy == "ddp":
            from lowbit.distributed.ddp import wrap_ddp

            wrapped, self.comm = wrap_ddp(model, precision, self._device, sum_gradients)
        else:
            from lowbit.distributed.fsdp import wrap_fsdp

            wrapped = model = wrap_fsdp(model, precision, self._device, sum_gradients)
        # a group of one draws what one process draws: the one stream, unchanged
        self.random = RankRandom(self.rank, self._device) if self.world_size > 1 else None
        if self.random is not None:
            self.random.install(wrapped)
        return wrapped, model

    def accumulating(self, model, more: bool):
        """Within: a micro-batch whose gradients are not yet reduced (all but the last)."""
        if not more:
            return contextlib.nullcontext()
        if self.strategy == "ddp":
            return model.no_sync()
        return _fsdp_no_sync(model)

    def zero_grad(self, optimizer) -> None:
        """DDP's gradients are views of its all-reduce buckets (`lowbit.distributed.ddp`): zeroed,
        not dropped, so that the next backward accumulates into the buckets, ``--grad-accum``'s
        micro-batches under ``no_sync`` included. Dropped, those micro-batches made gradients of
        their own beside the buckets, a second copy of every gradient until the last one."""
        optimizer.zero_grad(set_to_none=self.strategy != "ddp")

    @contextlib.contextmanager
    def alone(self):
        previous = set_scale_agreement(None)
        try:
            yield
        finally:
            set_scale_agreement(previous)

    def _reduce(self, value: float, op) -> float:
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64, device=self._device)
        if self._device.type == "cuda":
            t = t.float()
        dist.all_reduce(t, op=op)
        return t.item()

    def check_same_data(self, fingerprint: dict | None) -> None:
        """Refuse a run whose ranks read other contents as their data (``fingerprint``, the
        task's). Under torchrun across nodes each node reads its own copy of --data, and where
        one differed (half synced, another version) every rank trained on, silently, each on
        its rows of another global batch. Every rank gathers every rank's fingerprint and
        refuses alike: none is left waiting in a collective."""
        import torch.distributed as dist

        from lowbit.train.tasks import same_data

        seen: list = [None] * self.world_size
        dist.all_gather_object(seen, fingerprint)
        other = next((r for r, theirs in enumerate(seen) if not same_data(seen[0], theirs)), None)
        if other is not None:
            raise UsageError(
                f"rank {other} reads other data than rank 0 (--data, or the built-in corpus of "
                "each node's Python, holds other contents: another node, another copy?); fix: "
                "give every rank the same data (a shared folder, identical copies, one Python)"
            )

    def mean(self, value: float) -> float:
        import torch.distributed as dist

        return self._reduce(value, dist.ReduceOp.SUM) / self.world_size

    def total(self, value: float) -> float:
        import torch.distributed as dist

        return self._reduce(value, dist.ReduceOp.SUM)

    def any(self, flag: bool) -> bool:
        import torch.distributed as dist

        return self._reduce(1.0 if flag else 0.0, dist.ReduceOp.MAX) > 0

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def close(self) -> None:
        """Leave the process group. A clean exit first meets the other ranks at a barrier: a rank
        that destroyed the group while another was still inside the last collective aborted that
        one ("terminate called without an active exception"). Called while an exception
        propagates (the caller's ``finally``) it does not wait: the others may be in another
        collective, which a barrier would be paired with, or stopped already (the launcher stops
        them once a rank has failed)."""
        import torch.distributed as dist

        set_scale_agreement(None)
        try:
            if dist.is_initialized() and sys.exc_info()[0] is None:
                dist.barrier()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            restore_env(getattr(self, "replaced_env", {}))


def restore_env(replaced: dict) -> None:
    """Put back the variables a one-process group replaced (None: it was unset)."""
    for key, value in replaced.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def join(strategy: str, device: torch.device) -> Ranks:
    """Join the process group described by the environment (torchrun's variables), or start a
    one-process group when there is none; returns this rank's `Ranks`."""
    import torch.distributed as dist

    timeout = collective_timeout()  # a bad LOWBIT_DIST_TIMEOUT fails before anything changes
    # One process: a group of one, in variables of its own. The caller's values of those are
    # put back on close: popped, those exported for a later torchrun or init_process_group in
    # the same process were gone after `lowbit.train.train`. Its store is
    # in this process (a `HashStore`): no port. A port from `free_port` was free only until
    # init_process_group bound it again, a race with every process picking ports beside it
    # (another run's ranks, whose clients could join this store), and a MASTER_PORT of the
    # caller's was replaced for nothing.
    replaced_env, store = {}, None
    if not torchrun_env():
        own_env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        replaced_env = {key: os.environ.get(key) for key in own_env}
        os.environ.update(own_env)
        store = dist.HashStore()
    if device.type == "cuda":
        device = local_cuda_device()
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
        if "OMP_NUM_THREADS" not in os.environ:  # share the cores between the local ranks
            local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    try:
        if store is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    except Exception as error:
        port = os.environ.get("MASTER_PORT")
        restore_env(replaced_env)
        if "EADDRINUSE" in str(error) or "address already in use" in str(error).lower():
            raise UsageError(
                f"port {port} is in use (another run?); fix: choose "
                "another --master-port for torchrun, or unset MASTER_PORT"
            ) from None
        raise
    ranks = Ranks(strategy, device)
    ranks.replaced_env = replaced_env
    return ranks
