"""Where the optimizer's arithmetic happens and how its result is rounded back to the parameters.

- `FullPrecisionUpdate`: fp32 parameters; the optimizer steps on them directly.
- `LowPrecisionUpdate`: 16-bit parameters. For the step, the optimizer holds an fp32 stand-in for
  each parameter (its master weight, or a transient upcast) with an fp32 copy of its gradient;
  the wrapped optimizer, whatever it is, steps in fp32 (its states are fp32); the result is
  rounded back into the 16-bit parameter, in place (for FSDP2: into the rank's shard):

  * master weights (``O2``, Micikevicius et al. 2018): the fp32 copy persists between steps, so
    updates smaller than the 16-bit spacing accumulate in it; write-back rounds to nearest.
  * no master weights, nearest: ``w <- round(w + u)`` loses every update smaller than half the
    spacing of w (bf16: ``|u| < 2**-9 |w|``): the small-update problem.
  * stochastic rounding: ``w <- SR(w + u)`` is unbiased, ``E[w_new] = w + u``, so small updates
    survive in expectation (Zamirai et al. 2020).
  * Kahan compensation: a 16-bit buffer ``c`` keeps what rounding lost, ``v = w + c + u``,
    ``w <- round(v)``, ``c <- round(v - w)`` (Kahan summation; Zamirai et al. 2020), at the cost of
    one extra 16-bit tensor per parameter.
"""

from __future__ import annotations

import contextlib
import sys
import types
import warnings

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks

from lowbit.errors import UsageError
from lowbit.formats import cast
from lowbit.optim.adamw import check_saved_groups
from lowbit.optim.states import StatePrecision
from lowbit.recipes.recipe import UpdateRounding


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def dtype_following_states(optimizer: torch.optim.Optimizer, params: list) -> list[dict]:
    """The states of ``params`` in ``optimizer`` whose dtypes follow their parameter's, as
    `Optimizer.load_state_dict` casts them: none of lowbit's bf16 optimizer states
    (`AdamWBf16States`), whose moments are bf16 by design whatever the parameter's dtype."""
    if getattr(optimizer, "state_precision", None) == StatePrecision.BF16:
        return []
    return [optimizer.state.get(p, {}) for p in params]


def rounded_states(state: dict) -> list[str]:
    """The keys of the 16-bit tensors of an optimizer's ``state`` (its ``step`` count aside)
    that a step or a load made, rounded to 16 bits already; none where the constructor made
    them, which holds nothing rounded: Adagrad's sum, at step 0, and the zeros of an optimizer
    that counts no steps (a user's, making its buffers up front)."""
    rounded = [
        key
        for key, value in state.items()
        if key != "step"
        and torch.is_tensor(value)
        and value.dtype in (torch.bfloat16, torch.float16)
    ]
    if "step" in state:
        made_by_steps = float(state["step"]) > 0
    else:
        made_by_steps = any(bool(local_values(state[key]).any()) for key in rounded)
    return rounded if made_by_steps else []


def upcast_states(states: list[dict]) -> None:
    """Cast the floating tensors of each state (`dtype_following_states`) to fp32, in place."""
    for state in states:
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point():
                state[key] = value.float()


class FullPrecisionUpdate:
    # An optimizer stepped without `wrap` loses nothing here: there is no state per parameter.
    needs_wrapping = False

    def wrap(self, optimizer) -> None:
        pass

    def fp32_params(self, optimizer):
        """Within: the optimizer's parameters are fp32 (they are)."""
        return contextlib.nullcontext()

    def prepare(self, optimizer) -> list[torch.Tensor]:
        """Ready the gradients for unscaling/clipping; returns the tensors the step updates whose
        ``.grad`` holds one (here: the parameters)."""
        return [p for p in optimizer_params(optimizer) if p.grad is not None]

    def step(self, optimizer, closure=None) -> None:
        optimizer.step() if closure is None else optimizer.step(closure)

    def abort(self, optimizer) -> None:
        """A skipped step: nothing to undo."""

    def release(self, optimizer) -> None:
        """A prepared step that will not be taken: nothing to drop."""

    def holds_prepared(self, optimizer) -> bool:
        """Whether a prepared step of ``optimizer`` is still to be taken: none is held here."""
        return False

    def keep_only(self, params: list) -> None:
        """No state per parameter to drop."""

    parts: tuple[str, ...] = ()  # the parts of a loaded state this update reads: none

    def state_dict(self, params: list) -> dict:
        return {}

    def load_state_dict(self, state: dict, params: list) -> None:
        pass


class LowPrecisionUpdate:
    """16-bit parameters updated in fp32 with master weights, SR or Kahan write-back.

    The optimizer never sees a 16-bit parameter's data: for the step (and while a checkpoint's
    optimizer states are loaded or initialized) each 16-bit parameter is replaced in the
    optimizer's ``param_groups``, and its states re-keyed, by an fp32 stand-in: the persistent
    master weight, or a transient upcast. The rounded result is written back into the parameter
    in place, so the parameter object, its dtype and its storage never change. That is what makes
    the update work on FSDP2's sharded parameters: a sharded parameter is a DTensor whose local
    shard is a view of the storage FSDP all-gathers from, so the master weights, Kahan buffers and
    the write-back are per shard (``DTensor._local_tensor``); assigning ``p.data`` would change
    the DTensor's metadata but not its local shard.
    """

    def __init__(self, master: bool, rounding: UpdateRounding):
        self.master = master
        self.rounding = rounding
        # Keyed by the parameter itself (a tensor hashes by identity), not by its id(): a deep copy
        # of the precision with its model and optimizer pairs each copied parameter with the copy
        # of its master weight or Kahan buffer, where copied ids would pair none.
        # param -> fp32 master (DTensor if sharded)
        self.masters: dict[torch.Tensor, torch.Tensor] = {}
        # param -> the version counter of its values when they last were its master's rounding, or
        # (Kahan) the rounding its buffer compensates
        self._written_versions: dict[torch.Tensor, int] = {}
        self.compensation: dict[torch.Tensor, torch.Tensor] = {}  # param -> 16-bit Kahan buffer
        # id(optimizer) -> {id(param): (param, fp32 stand-in)} of its prepared step
        self._stand_ins: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        # id(param) -> its 16-bit gradient that `prepare` copied, and that gradient's version then
        self._copied_grads: dict[int, tuple[torch.Tensor, int]] = {}
        self._held_warned = False  # `_write_back`'s warning of fp16 values held at 65504

    # Its master weights and Kahan buffers are saved for the optimizers `wrap` was given.
    needs_wrapping = True

    def wrap(self, optimizer) -> None:
        """Make the optimizer's states fp32, and keep them fp32 when a checkpoint is loaded.

        States an optimizer creates in its constructor (Adagrad's sum) take the 16-bit parameter's
        dtype; they are upcast here (in fp16 Adagrad's eps of 1e-10 is 0, and its first step on a
        zero gradient divides 0 by 0). ``Optimizer.load_state_dict`` casts floating states to each
        parameter's dtype; during the load the optimizer holds the fp32 stand-ins, so the states
        keep their precision.

        States a step or a load made before the optimizer was wrapped are rounded to 16 bits
        already: upcasting them cannot bring back what the rounding lost, and a resumed run would
        silently differ from the uninterrupted one, so they are refused. The bf16 moments of
        lowbit's bf16 optimizer states (`AdamWBf16States`) are bf16 by design and stay bf16.
        """
        states = dtype_following_states(
            optimizer, [p for p in optimizer_params(optimizer) if self._low(p)]
        )
        for state in states:
            rounded = rounded_states(state)
            if rounded:
                raise UsageError(
                    f"precision.wrap_optimizer(): the {type(optimizer).__name__}'s states "
                    f"({', '.join(rounded)}) are 16-bit already, loaded or stepped before it was "
                    "wrapped; fix: optimizer = precision.wrap_optimizer(optimizer) before "
                    "optimizer.load_state_dict(...) and before its first step"
                )
        upcast_states(states)
        loading: list = []

        def before_load(opt, state_dict):
            # refused before the swap: a load torch refuses calls no post-hook to swap back
            check_saved_groups(opt, state_dict)
            loading.append(self._swap_in(opt, self._upcasts(opt)))

        def after_load(opt):
            self._swap_out(opt, loading.pop())

        optimizer.register_load_state_dict_pre_hook(before_load)
        optimizer.register_load_state_dict_post_hook(after_load)
        _undo_swap_on_failed_load(optimizer, loading, self._swap_out)

    @contextlib.contextmanager
    def fp32_params(self, optimizer):
        """Within: the optimizer holds fp32 stand-ins for its 16-bit parameters (e.g. for
        creating its states from fp32 data); afterwards the states belong to the parameters."""
        swapped = self._swap_in(optimizer, self._upcasts(optimizer))
        try:
            yield
        finally:
            self._swap_out(optimizer, swapped)

    # --- stand-ins ---------------------------------------------------------------------------

    @staticmethod
    def _low(p: torch.Tensor) -> bool:
        """Whether ``p`` is stepped through an fp32 stand-in: floating parameters narrower than
        fp32 (bf16, fp16). An fp64 one (added beside the converted model) steps as it is, as
        under fp32 recipes: through a stand-in it lost every update below fp32's precision, and
        stochastic rounding rounded it to fp16 (held at 65504)."""
        return p.is_floating_point() and p.element_size() < 4

    def _upcasts(self, optimizer) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return {
            id(p): (p, self.masters[p] if p in self.masters else _fp32_leaf(p))
            for p in optimizer_params(optimizer)
            if self._low(p)
        }

    @staticmethod
    def _swap_in(optimizer, pairs: dict) -> dict:
        """Put each pair's fp32 tensor in its parameter's place (param_groups and states)."""
        for group in optimizer.param_groups:
            group["params"] = [pairs[id(p)][1] if id(p) in pairs else p for p in group["params"]]
        for p, hp in pairs.values():
            if p in optimizer.state:
                optimizer.state[hp] = optimizer.state.pop(p)
        return pairs

    @staticmethod
    def _swap_out(optimizer, pairs: dict) -> None:
        back = {id(hp): p for p, hp in pairs.values()}
        for group in optimizer.param_groups:
            group["params"] = [back.get(id(t), t) for t in group["params"]]
        for p, hp in pairs.values():
            hp.grad = None
            if hp in optimizer.state:
                optimizer.state[p] = optimizer.state.pop(hp)

    def _high_precision(self, p: torch.Tensor) -> torch.Tensor:
        """``p``'s fp32 stand-in. A parameter resized in place since its master weight or Kahan
        buffer was made (``resize_token_embeddings`` assigns the embedding's ``.data``; the step
        failed with "attempting to assign a gradient of size [80, 32] to a tensor of size
        [64, 32]") gets a master weight or Kahan buffer of its new shape, which keeps the old
        one's values in the rows both have."""
        if self.master:
            master = self.masters.get(p)
            if master is None:
                self.masters[p] = _fp32_leaf(p)
            elif master.shape != p.shape:
                self.masters[p] = _leading_rows(master, _fp32_leaf(p))
                _follow_parameter(self.masters[p], p, self.rounding)  # kept rows p no longer holds
            elif self._written_versions.get(p) != local_values(p)._version:
                _follow_parameter(master, p, self.rounding)
            self._written_versions[p] = local_values(p)._version
            return self.masters[p]
        value = _fp32_leaf(p)
        compensation = self.compensation.get(p)
        if self.rounding is UpdateRounding.KAHAN and compensation is not None:
            if compensation.shape != p.shape:
                compensation = _leading_rows(compensation, torch.zeros_like(p.detach()))
                self.compensation[p] = compensation
                _drop_stale_compensation(compensation, p)  # kept rows p no longer holds
            elif self._written_versions.get(p) != local_values(p)._version:
                _drop_stale_compensation(compensation, p)
            self._written_versions[p] = local_values(p)._version
            with torch.no_grad():
                value.add_(compensation)
        return value

    # --- the step ----------------------------------------------------------------------------

    def prepare(self, optimizer) -> list[torch.Tensor]:
        """The tensors the step updates whose ``.grad`` holds one: each 16-bit parameter's fp32
        stand-in with an fp32 copy of its gradient, and the fp32 parameters."""
        stepped = []
        stand_ins = self._stand_ins.setdefault(id(optimizer), {})
        for p in optimizer_params(optimizer):
            if p.grad is None or not self._low(p):
                if p.grad is not None:
                    stepped.append(p)
                continue
            hp = self._high_precision(p)
            hp.grad = p.grad.float()
            self._copied_grads[id(p)] = (p.grad, local_values(p.grad)._version)
            stand_ins[id(p)] = (p, hp)
            stepped.append(hp)
        return stepped

    def _round(self, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The rounding to ``dtype`` of the values this process holds of ``value`` (a DTensor's
        shard).

        Stochastic rounding draws from torch's global CPU generator, which every rank shares
        (seeded alike: under DDP each replica rounds the same averaged gradient, so the draws must
        be the same or the replicas drift apart). A shard rounded from it drew the draws of a
        tensor of the shard's shape: element i of every rank's shard took the same uniform
        (rounding noise correlated across shards), and ranks with shards of different sizes moved
        the shared stream unequally. So a shard takes one seed from the shared stream, as every
        rank does whatever its shard's size, and rounds with a generator of its own seeded by it
        and the shard's place in the whole tensor (`_shard_generator`): the shards' draws are
        independent, at the cost of one shard's rounding."""
        if self.rounding is not UpdateRounding.STOCHASTIC:
            return local_values(value).to(dtype)
        name = "bf16" if dtype == torch.bfloat16 else "fp16"
        if not _is_dtensor(value):
            return cast(value.detach(), name, "stochastic").to(dtype)
        local = local_values(value)
        return cast(local, name, "stochastic", _shard_generator(value)).to(dtype)

    def step(self, optimizer, closure=None) -> None:
        """(`Precision.step` refuses a ``closure`` here: the model does not read the stand-ins.)"""
        pairs = self._stand_ins.get(id(optimizer), {})
        self._check_copies(pairs)
        grads = [hp.grad for _, hp in pairs.values()]
        self._swap_in(optimizer, pairs)
        try:
            with _post_hooks_deferred(optimizer) as post_hooks:
                optimizer.step() if closure is None else optimizer.step(closure)
        except BaseException:
            # interrupted (Ctrl-C, an out-of-memory error): the stand-ins keep their gradients,
            # for a retried `Precision.step` to step through them; dropped, the retry stepped the
            # 16-bit weights themselves, without master weights or clipping, into 16-bit states
            self._swap_out(optimizer, pairs)
            for (_, hp), grad in zip(pairs.values(), grads):
                hp.grad = grad
            raise
        self._swap_out(optimizer, pairs)
        self._stand_ins.pop(id(optimizer), None)
        for p, _ in pairs.values():
            del self._copied_grads[id(p)]
        self._write_back(pairs)
        for hook in post_hooks:
            hook(optimizer, (optimizer,), {})

    def _write_back(self, pairs: dict) -> None:
        """Round each stepped stand-in into its 16-bit parameter (Kahan: keep what was lost).

        An updated value past fp16's largest finite value, 65504, is held at
        that value, in the parameter and in its master weight, with a warning: rounded, it became
        inf, the next forward's loss NaN, and loss scaling skipped every later step without a word
        (the loss scaler guards the gradients, not the weights; Apex's O2 copies such a master
        into an fp16 inf as well). The values past the range are counted on the device and read
        once per step, not once per parameter, from each tensor's extremes (no temporary of its
        size), and warned of once per run: a diverging run pushes them past it at every step."""
        beyond = []  # per fp16 parameter, whether the clamp held any of its values
        largest = torch.finfo(torch.float16).max
        with torch.no_grad():
            for p, hp in pairs.values():
                new = local_values(hp)
                if p.dtype == torch.float16 and new.numel():  # bf16's range is fp32's
                    low, high = torch.aminmax(new)
                    beyond.append(torch.maximum(high, -low) > largest)
                    new.clamp_(-largest, largest)  # in place: the master weight too; NaN stays
                rounded = self._round(hp, p.dtype)
                if self.rounding is UpdateRounding.KAHAN:
                    if p not in self.compensation:
                        self.compensation[p] = torch.zeros_like(p.detach())
                    local_values(self.compensation[p]).copy_(new - rounded.float())
                local_values(p).copy_(
                    rounded
                )  # in place: a sharded parameter's shard is FSDP's storage
                if self.master or self.rounding is UpdateRounding.KAHAN:
                    self._written_versions[p] = local_values(p)._version
        if self._held_warned or not beyond:
            return
        if bool(torch.stack([b.to(beyond[0].device) for b in beyond]).any()):
            self._held_warned = True
            warnings.warn(
                "lowbit: the optimizer's update took parameter values past fp16's largest value, "
                "65504; they are held there instead of becoming inf (said once); fix: a lower "
                "learning rate, weight decay, or bf16 parameters (bf16-low)",
                stacklevel=4,
            )

    def _check_copies(self, pairs: dict) -> None:
        """The step reads the fp32 gradient copies `prepare` made, so a change to a 16-bit
        ``.grad`` after it (``torch.nn.utils.clip_grad_norm_(model.parameters(), ...)`` after
        `Precision.unscale_`, GradScaler's idiom) would be silently lost: it is refused."""
        for p, _ in pairs.values():
            copied, version = self._copied_grads[id(p)]
            if p.grad is not copied or local_values(copied)._version != version:
                raise UsageError(
                    "a 16-bit parameter's .grad changed after precision.unscale_() or "
                    "clip_grad_norm_(), and the step reads the fp32 gradients those returned; "
                    "fix: clip the tensors precision.unscale_(optimizer) returns, e.g. "
                    "torch.nn.utils.clip_grad_norm_(precision.unscale_(optimizer), 1.0), "
                    "not model.parameters()"
                )

    def abort(self, optimizer) -> None:
        """Undo `prepare` for a skipped step: the 16-bit parameters come back untouched (their
        ``.grad`` too, until the loop's ``zero_grad``, as with GradScaler)."""
        for p, hp in self._stand_ins.pop(id(optimizer), {}).values():
            self._copied_grads.pop(id(p), None)
            hp.grad = None

    def holds_prepared(self, optimizer) -> bool:
        """Whether `prepare`'s stand-ins of ``optimizer`` are still to be stepped: a step
        interrupted before the optimizer's update keeps them (`step`), one interrupted after it
        (a step post-hook raising, Ctrl-C while the 16-bit weights are written) has used them."""
        return id(optimizer) in self._stand_ins

    def release(self, optimizer) -> None:
        """Drop `prepare`'s fp32 gradient copies of a step that will not be taken; the 16-bit
        gradients stay (more may accumulate on them)."""
        for p, hp in self._stand_ins.pop(id(optimizer), {}).values():
            self._copied_grads.pop(id(p), None)
            hp.grad = None

    def keep_only(self, params: list) -> None:
        """Drop the master weights and Kahan buffers of parameters not in ``params`` (no wrapped
        optimizer holds them any more): they kept those parameters and their fp32 copies alive."""
        kept = set(params)
        self.masters = {k: v for k, v in self.masters.items() if k in kept}
        self._written_versions = {k: v for k, v in self._written_versions.items() if k in kept}
        self.compensation = {k: v for k, v in self.compensation.items() if k in kept}

    @property
    def parts(self) -> tuple[str, ...]:
        """The parts of a loaded state this update reads (`state_dict`'s keys)."""
        reads = {"masters": self.master, "compensation": self.rounding is UpdateRounding.KAHAN}
        return tuple(part for part, read in reads.items() if read)

    def state_dict(self, params: list) -> dict:
        """Master weights and Kahan buffers by the index of their parameter in ``params``."""
        order = {p: index for index, p in enumerate(params)}
        return {
            "masters": {
                order[k]: v.detach().clone() for k, v in self.masters.items() if k in order
            },
            "compensation": {
                order[k]: v.clone() for k, v in self.compensation.items() if k in order
            },
        }

    def load_state_dict(self, state: dict, params: list) -> None:
        """Replace the master weights and Kahan buffers of ``params`` by ``state``'s (entries
        whose index is past ``params`` are left for a later call with more parameters). An entry
        of another shape than its parameter's (a state saved with another model, or with its
        optimizer's parameters in another order) is refused here, not by the next step's arithmetic
        with a message that names neither."""
        for part, name in (("masters", "master weight"), ("compensation", "Kahan buffer")):
            for i, v in state.get(part, {}).items():
                if i < len(params) and v.shape != params[i].shape:
                    raise UsageError(
                        f"precision.load_state_dict(): the saved {name} of parameter {i} has shape "
                        f"{tuple(v.shape)}, the parameter {tuple(params[i].shape)}: the state is "
                        "another model's, or its optimizer's parameters were in another order; "
                        "fix: load the precision state saved with this model and optimizer"
                    )
        known = set(params)
        self.masters = {k: v for k, v in self.masters.items() if k not in known}
        self._written_versions = {k: v for k, v in self._written_versions.items() if k not in known}
        self.compensation = {k: v for k, v in self.compensation.items() if k not in known}
        # Only the parts this update reads: a state saved under another recipe (bf16-low's masters
        # loaded under bf16-pure-kahan) would otherwise keep entries that never move again and are
        # saved with every later state (and counted by `lowbit.memory.measure`).
        masters = state.get("masters", {}) if "masters" in self.parts else {}
        compensation = state.get("compensation", {}) if "compensation" in self.parts else {}
        # an entry of a parameter this update no longer steps through a stand-in (an fp64 one,
        # stepped so before session 34) would never move again and be saved with every state
        for i, v in masters.items():
            if i < len(params) and self._low(params[i]):
                self.masters[params[i]] = v.detach().clone().requires_grad_()
        for i, v in compensation.items():
            if i < len(params) and self._low(params[i]):
                self.compensation[params[i]] = v.clone()


def _undo_swap_on_failed_load(optimizer, loading: list, swap_out) -> None:
    """Make ``optimizer.load_state_dict`` swap the parameters back in when the load fails after
    the pre-hook swapped the stand-ins in (``loading`` holds that swap until the post-hook undoes
    it): torch runs no post-hook when a later pre-hook (a user's) raises, or when it cannot cast a
    saved state, and the optimizer went on stepping the stand-ins, so the model stopped training.

    The wrapper is an attribute of this optimizer alone, as the load hooks are: a deep copy or an
    unpickled copy (``Optimizer.__getstate__`` keeps its defaults, state and param groups) has
    neither. It wraps what loads now (the class's method, or another precision's wrapper of it),
    so each precision that wrapped the optimizer undoes its own swap."""
    inner = getattr(optimizer.load_state_dict, "__func__", None)
    if inner is None:  # not a method (a user's function put there): not wrapped, as before
        return

    def load_state_dict(opt, state_dict):
        try:
            return inner(opt, state_dict)
        except BaseException:
            if loading:  # the post-hook did not run
                swap_out(opt, loading.pop())
            raise

    optimizer.load_state_dict = types.MethodType(load_state_dict, optimizer)


@contextlib.contextmanager
def _post_hooks_deferred(optimizer):
    """Within, the optimizer's step post-hooks (its own, then the global ones, as torch calls
    them) are taken out, and listed for the caller to call once the step is written back: called
    by the optimizer's step they saw the stand-ins in its ``param_groups``, its states keyed by
    them, and the model's weights before the step (an EMA updated from the model in a post-hook
    lagged a step behind, ``optimizer.state[param]`` failed with KeyError). An optimizer without
    step hooks (duck-typed) has none to defer."""
    own = getattr(optimizer, "_optimizer_step_post_hooks", None)
    if not own and not _global_optimizer_post_hooks:  # none (or no hooks at all): the usual step
        yield []
        return
    shared = _global_optimizer_post_hooks
    taken = [dict(own), dict(shared)]
    own.clear()
    shared.clear()
    try:
        yield [*taken[0].values(), *taken[1].values()]
    finally:
        for hooks, saved in zip((own, shared), taken, strict=True):
            added = dict(hooks)  # registered by the step itself: kept, after the earlier ones
            hooks.clear()
            hooks.update(saved)
            hooks.update(added)


def _follow_parameter(master: torch.Tensor, p: torch.Tensor, rounding: UpdateRounding) -> None:
    """Where the 16-bit ``p`` no longer holds the rounding of its fp32 ``master`` (for stochastic
    rounding: either 16-bit value around it), the master takes p's value.

    The step updates the master and writes its rounding into ``p``, so without this a write into
    the parameter between steps (``model.load_state_dict`` mid-run, restoring the best weights, a
    weight constraint) would be undone by the next step, as Apex's O2 masters undo it. A master
    that still rounds to ``p`` keeps its extra bits (a resumed run loads both, in either order)."""
    with torch.no_grad():
        low, high = local_values(p), local_values(master)
        widened = low.float()
        if rounding is UpdateRounding.STOCHASTIC:
            beyond = torch.where(high > widened, torch.inf, -torch.inf).to(low.dtype)
            neighbour = torch.nextafter(low, beyond).float()  # p's neighbour on master's side
            stale = (high - widened) * (neighbour - high) < 0  # master lies past that neighbour
        else:
            stale = high.to(low.dtype) != low
        high.copy_(torch.where(stale, widened, high))


def _drop_stale_compensation(compensation: torch.Tensor, p: torch.Tensor) -> None:
    """Where the Kahan buffer no longer fits the 16-bit ``p``, it is zeroed: it compensates values
    that a write into the parameter between steps replaced, and the next step added it to them
    (a weight pruned to 0 in place came back as what the rounding of its old value lost). Only
    a write that leaves the buffer beyond half the new value's spacing is seen so (pruning, a
    weight moved to a much smaller magnitude): after one that keeps the magnitude (the best
    weights restored, most clamps) a buffer within that half is kept and added, at most half a
    unit in the last place, as no record of the old values tells it apart.

    The write-back's buffer is what rounding ``v`` to ``w`` lost, at most half of w's spacing to
    its neighbour on that side (rounded to 16 bits it may reach that half: not ``round(w + c) ==
    w`` at a tie), so a buffer within it is kept: a resumed run loads the model and the precision
    state in either order."""
    with torch.no_grad():
        low, buffer = local_values(p), local_values(compensation).float()
        toward = torch.where(buffer > 0, torch.inf, -torch.inf).to(low.dtype)
        spacing = (torch.nextafter(low, toward).float() - low.float()).abs()
        local_values(compensation).masked_fill_(2 * buffer.abs() > spacing, 0)


def _leading_rows(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new`` with the rows it shares with ``old`` (a tensor of its parameter's shape before a
    resize in place, which keeps the leading rows: new tokens are rows added at the end) copied
    from ``old``; ``new`` as it is where the rows differ in shape or the tensors are sharded."""
    if old.shape[1:] != new.shape[1:] or _is_dtensor(new) or not new.dim():
        return new
    rows = min(len(old), len(new))
    with torch.no_grad():
        new[:rows].copy_(old[:rows])
    return new


def _fp32_leaf(p: torch.Tensor) -> torch.Tensor:
    """An fp32 copy of ``p`` that an optimizer can step (a DTensor for a sharded ``p``)."""
    return p.detach().float().requires_grad_()


def local_values(t: torch.Tensor) -> torch.Tensor:
    """The values this process holds: a DTensor's local shard (a view of FSDP's storage, so writes
    reach the next all-gather), or the tensor's data itself."""
    return t._local_tensor if _is_dtensor(t) else t.detach()


def _shard_generator(t: torch.Tensor) -> torch.Generator:
    """A generator for the stochastic rounding of a DTensor's local shard: seeded from one draw
    of the shared CPU stream (the same on every rank) and the flat index in the whole tensor of
    the shard's first element, so that no two shards draw alike."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from lowbit.formats.counter_rng import draw_seed, seeded_generator

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    strides = torch.empty(t.shape, device="meta").stride()
    first = sum(index * stride for index, stride in zip(offset, strides, strict=True))
    return seeded_generator(draw_seed(), first, t.device)


def _is_dtensor(t: torch.Tensor) -> bool:
    # without importing torch.distributed (slow, absent from some builds): a DTensor's module is
    # loaded whenever one exists
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)
