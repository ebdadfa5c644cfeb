"""Fused CPU kernels, compiled on first use with the machine's C++ compiler.

Why lowbit has its own C++ here: bit-faithful emulation of fp8/fp6/fp4/int8 quantization needs
rounding onto formats that PyTorch's CPU kernels do not have (fp6, fp4, OCP MX block scales, NVFP4's
two-level scales), and composing it from PyTorch ops costs about a dozen passes over every GEMM
operand. torchao's MX/NVFP4 casts target CUDA (Triton) and `torch.compile`'s CPU code drops
fp32 -> bf16 round trips unless told otherwise, so no well-kept library does this job on CPU.
`quantize.cpp` does the block amax, the scale and the rounding in one pass per block, bit-identical
to the PyTorch path it replaces (tests/kernels check every format, granularity and scale rule),
and can first apply a random Hadamard transform to each block (a fast Walsh-Hadamard transform in
the order `lowbit.formats.hadamard.transform` fixes) so that no transformed copy is written;
`epilogue.cpp` applies per-row and per-column GEMM scales in one pass; `stats.cpp` measures a
quantized operand's error statistics (`lowbit.diagnostics.stats`) in one pass; `lean_linear.cpp`
makes an int8 layer's forward and backward one call each (`lowbit.nn.linear._lean`).

The extension is built by `torch.utils.cpp_extension` (with ninja) into PyTorch's extension cache
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) the first time a CPU tensor is
quantized: about half a minute once per machine (and per checkout of lowbit and virtual
environment: `_build_tag`), then milliseconds. A build lock that a build
killed mid-way left is removed after ten minutes (`_clear_stale_lock`); torch would wait for it
for ever. When there is no compiler, a compile fails or the cache folder cannot be written,
lowbit warns once, in one line saying why, and uses the PyTorch path (same results, slower);
``LOWBIT_KERNELS=0`` in the environment takes that path without a word. A compile error is
remembered in the build folder (`_FailureRecord`), so later processes fall back at once instead
of compiling the same failure again. CUDA tensors always take
the PyTorch path.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import platform
import re
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from lowbit.dynamo_marks import assume_constant_result
from lowbit.folder_lock import lock_folder
from lowbit.kernels import fake
from lowbit.kernels.fake import ROW_BLOCK as ROW_BLOCK  # quantize_rows' block for one per row
from lowbit.threadflag import ThreadFlag

_SOURCES = [
    Path(__file__).with_name(name)
    for name in ("quantize.cpp", "epilogue.cpp", "stats.cpp", "lean_linear.cpp")
]
# -ffp-contract=off: no fused multiply-adds, so every fp32 operation rounds as PyTorch's does.
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
if platform.machine().lower() in ("x86_64", "amd64"):
    # Where the CPU has AVX-512, use whole 512-bit registers (GCC's default for -march=native on
    # Intel is 256): the stochastic-rounding hash's 64-bit multiplications run twice as wide
    # (mxfp4's backward operands: 0.62 -> 0.57 ms each, scratch timing); no effect elsewhere.
    _FLAGS.append("-mprefer-vector-width=512")
_lock = threading.Lock()
_state = {"loaded": None, "error": None}
_disabled = ThreadFlag()


def _build_tag() -> str:
    """A short hash of what a build folder's objects depend on besides the sources' contents, which
    names the folder (``lowbit_kernels_TAG``). This CPU's instruction-set flags: ``-march=native``
    code built on one CPU may not run on another, so machines sharing a home directory (and so the
    cache) get their own build. The sources' folder and torch's: ninja rebuilds an object whose
    command line changed, and another checkout of lowbit, or another virtual environment's torch
    (its include path), compiles other command lines. Sharing one folder, two of them rebuilt each
    other's objects at every load (about half a minute each, under the folder's lock, which every
    process loading the kernels then waited for); each has its own folder now. And the ninja that
    builds them (`_ninja`): ninja 1.11 and 1.13 hash the command lines in ``.ninja_log``
    differently, so two of them sharing a folder rebuilt every object for each other."""
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags += next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags += platform.processor()
    flags += f"\n{_SOURCES[0].parent.resolve()}\n{Path(torch.__file__).parent.resolve()}"
    ninja = _ninja()
    flags += f"\n{Path(ninja).resolve() if ninja else None}"
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _ninja() -> str | None:
    """The ninja that builds the kernels: the ``ninja`` package's, lowbit's dependency
    (`_own_ninja_first`), else the first on PATH; None where there is none."""
    try:
        import ninja

        own = Path(ninja.BIN_DIR) / "ninja"
    except (ImportError, AttributeError):
        own = None
    return str(own) if own is not None and own.is_file() else shutil.which("ninja")


@contextlib.contextmanager
def _own_ninja_first():
    """Within: the folder of `_ninja` first on PATH, where torch's build runs ``ninja`` by name.
    Torch ran the first on PATH: a process of a virtual environment not activated (``.venv/bin``
    not on PATH) found the system's ninja, an activated one pip's, and ninja 1.11 and 1.13 hash
    ``.ninja_log``'s command lines differently, so each rebuilt every object of the other's
    (67-138 s a build, under the lock every process loading the kernels waits for; session 37);
    with no system ninja the unactivated one fell back to the slower PyTorch path."""
    ninja = _ninja()
    path = os.environ.get("PATH")
    if ninja is not None:
        os.environ["PATH"] = os.pathsep.join([str(Path(ninja).parent), *filter(None, [path])])
    try:
        yield
    finally:
        if path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = path


# A build lock older than this is taken for one an interrupted build left (a build takes well
# under a minute; see `_clear_stale_lock`).
_STALE_LOCK_SECONDS = 600


def _clear_stale_lock(build_dir: Path) -> bool:
    """Remove the ``lock`` file that a build killed by SIGTERM or SIGKILL left in ``build_dir``.

    `torch.utils.cpp_extension.load` takes that file at every load, cached or not, and a process
    that finds it waits for it to go, with no time limit: one left by a killed first build (a
    job stopped while the kernels compiled) would hang every later lowbit run on the machine,
    silently. A lock older than `_STALE_LOCK_SECONDS` is removed with a note; a recent one is
    another process's build or load in progress (the ranks of a distributed run start together),
    which is waited for (`_LongWait`). True when there is such a lock."""
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:  # no lock: the usual case
        return False
    if age > _STALE_LOCK_SECONDS:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
        print(
            f"lowbit: removed {lock}, a build lock {age / 60:.0f} minutes old that an "
            "interrupted build of the kernels left",
            file=sys.stderr,
        )
        return False
    return True


# Seconds of waiting for another process's lock before saying so: torch takes the lock at every
# load, a cached one too, so the ranks of every distributed run met each other's for a moment,
# and each run printed the note below though nothing was being built.
_QUIET_WAIT_SECONDS = 3


class _LongWait:
    """Say, once another process's ``lock`` has been waited for `_QUIET_WAIT_SECONDS`, where it is
    (one left by a build killed minutes ago would otherwise hang the run without a word), and
    remove it once it is stale (`_clear_stale_lock`) if it is still there. A watcher thread looks
    for the lock every tenth of a second: a lock released before then is no long wait, whatever
    follows (this process's own build, or a slow load, which held a timer over the whole load
    past the deadline, and named a lock no process held). Call `end` when the load is over.

    Of the processes that wait for one lock together (the ranks of a distributed run, the
    workers of ``lowbit compare --jobs``), one says so (`said`): each printed the note, and its
    own "waited" line after it. That one holds a ``flock`` on the build folder while it waits;
    the kernel drops it however the process ends, so a killed one silences no later wait."""

    def __init__(self, lock: Path):
        self.said = False
        self._over = threading.Event()
        threading.Thread(target=self._watch, args=(lock,), daemon=True).start()

    def end(self) -> None:
        self._over.set()

    def _watch(self, lock: Path) -> None:
        deadline = time.monotonic() + _QUIET_WAIT_SECONDS
        while time.monotonic() < deadline:
            if self._over.wait(0.1) or not lock.exists():
                return
        held = lock_folder(lock.parent)  # the one that says it waits; False: another
        try:
            if held is not False:
                self.said = True
                print(
                    f"lowbit: waiting for another process's build of the kernels (lock: {lock}; "
                    "if no build is running, delete it)",
                    file=sys.stderr,
                )
            # A lock whose process was killed while it held it is never released, and torch
            # waits for it without a limit: it was stale only to a later run, so a run started
            # just after the kill (a job stopped at start-up, when every load takes the lock)
            # hung for good. Removed once it is stale, torch's wait ends and the load goes on.
            while not self._over.wait(1.0) and _clear_stale_lock(lock.parent):
                pass
        finally:
            if held is not None and held is not False:  # a descriptor (False is an int too)
                os.close(held)  # drops the flock with it


def _absolute_extensions_dir() -> None:
    """Make ``$TORCH_EXTENSIONS_DIR`` mean what a shell user means by it before torch reads it.

    torch joins the value to the extension's name as it is: an empty one (``export
    TORCH_EXTENSIONS_DIR=``) put the build folder in the current directory, so every other
    directory compiled afresh and left one there; ``~/x`` made a folder named ``~`` there; a
    relative one depended on where each process started. Empty now means unset (torch's default
    cache), and ``~`` and relative paths are resolved once, for this process and its children."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        return
    if root.strip():
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.abspath(os.path.expanduser(root))
    else:
        del os.environ["TORCH_EXTENSIONS_DIR"]


def _build() -> None:
    with _own_ninja_first():
        _build_here()


def _build_here() -> None:
    from torch.utils import cpp_extension

    # Without this check torch runs the build anyway, prints a page-long warning that "c++" is
    # not the compiler PyTorch was built with, and fails with the compile command as its message.
    get_compiler = getattr(cpp_extension, "get_cxx_compiler", None)  # torch >= 2.1
    compiler = get_compiler() if get_compiler else os.environ.get("CXX", "c++")
    if not shutil.which(compiler.split(" ")[0]):
        raise RuntimeError(f"no C++ compiler: {compiler!r} ($CXX, default c++) is not on PATH")
    _absolute_extensions_dir()
    name = f"lowbit_kernels_{_build_tag()}"
    other_build = False  # another process's, which this one waits for rather than compiling
    build_dir = None
    with contextlib.suppress(AttributeError, OSError):  # torch's helper for the folder it builds in
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        other_build = _clear_stale_lock(build_dir)
    failed_before = _FailureRecord(build_dir, compiler) if build_dir else None
    if failed_before:
        failed_before.raise_if_recorded()
    start = time.perf_counter()
    waiting = _LongWait(build_dir / "lock") if other_build else None
    try:
        cpp_extension.load(
            name=name,
            sources=[str(source) for source in _SOURCES],
            extra_cflags=_FLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except RuntimeError as error:
        reason = _build_failure(error)
        compile_error = str(error).startswith("Error building extension")
        if failed_before and compile_error and not _PASSING.search(reason):
            failed_before.record(reason)  # which the next try would meet again
        raise
    finally:
        if waiting is not None:
            waiting.end()
    seconds = time.perf_counter() - start
    what = "the fused quantization kernels"
    if waiting is not None and waiting.said:
        print(
            f"lowbit: waited {seconds:.0f} s for another process's build of {what}", file=sys.stderr
        )
    elif seconds > 3 and not other_build:  # a compile, not a cache hit
        print(f"lowbit: compiled {what} in {seconds:.0f} s", file=sys.stderr)


class _EarlierBuildFailure(RuntimeError):
    """The build failed the same way in an earlier process; the message is that failure's line."""


class _FailureRecord:
    """A compile that failed, remembered in the build folder so that later processes skip it.

    A compile error comes back every time for the same sources, flags and compiler, and each try
    costs about half a minute: without the record, every `lowbit` command (and every rank of a
    distributed run) compiled again before falling back. The record holds a hash of what the
    build depends on (the sources, the flags, torch's version, the compiler's path and its file's
    modification time), so editing a source or installing another compiler builds again; so does
    deleting the record, as the note says. Failures of the folder or a missing compiler are not
    recorded: they cost nothing to meet again."""

    def __init__(self, build_dir: Path, compiler: str):
        self.path = build_dir / "lowbit-build-failed.txt"
        digest = hashlib.sha256()
        for source in _SOURCES:
            digest.update(source.read_bytes())
        program = shutil.which(compiler.split(" ")[0]) or compiler
        with contextlib.suppress(OSError):
            program += f"@{os.stat(program).st_mtime_ns}"
        digest.update(repr((_FLAGS, torch.__version__, compiler, program)).encode())
        self.key = digest.hexdigest()

    def raise_if_recorded(self) -> None:
        try:
            key, reason = self.path.read_text().split("\n", 1)
        except (OSError, ValueError):  # no record (the usual case), or an unreadable one
            return
        if key == self.key:
            raise _EarlierBuildFailure(
                f"{reason.strip()} (an earlier build; delete {self.path} to try again)"
            )

    def record(self, reason: str) -> None:
        with contextlib.suppress(OSError):  # a folder that cannot be written: retried next time
            self.path.write_text(f"{self.key}\n{reason}\n")


def available() -> bool:
    """True when the fused kernels are compiled and loaded (builds them on the first call)."""
    loaded = _state["loaded"]
    return _load_once() if loaded is None else loaded


@assume_constant_result
def _load_once() -> bool:
    """`available`'s first call. Marked constant so that a model compiled before its first eager
    step builds the kernels while Dynamo traces it (which runs such a function and keeps its
    result), instead of breaking the graph at the lock around the build at every quantization."""
    with _lock:
        if _state["loaded"] is None:
            _state["loaded"] = _load()
    return _state["loaded"]


def _load() -> bool:
    if os.environ.get("LOWBIT_KERNELS", "1") == "0":
        return False
    try:
        _build()
    except Exception as error:  # no compiler, no ninja, a build error: fall back, say why
        earlier = isinstance(error, _EarlierBuildFailure)
        _state["error"] = str(error) if earlier else _build_failure(error)
        fix = (
            "set TORCH_EXTENSIONS_DIR to a folder you can write"
            if getattr(error, "errno", None) in _FOLDER_ERRNOS
            else "mend the compiler (the error above), then delete the record it names"
            if earlier
            else "install a C++ compiler and `pip install ninja`"
        )
        warnings.warn(
            "lowbit: could not build the fused quantization kernels "
            f"({_state['error']}); using the PyTorch path (same results, slower). "
            f"Fix: {fix}, or set LOWBIT_KERNELS=0 to silence this.",
            stacklevel=3,
        )
        return False
    fake.register()  # so that torch.export and torch.compile can trace the ops (see fake.py)
    _define_traced_quantize_rows()
    return True


# The build folder's failures (no permission, a read-only filesystem, a file in the way, a full
# disk), whose fix is another folder, not a compiler.
_FOLDER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.ENOSPC}
# A compile that failed for the machine's state at the time, not for the sources: the compiler
# killed (out of memory on a busy machine), a full disk. Not recorded: the next process tries again.
_PASSING = re.compile(
    r"Killed|No space left|Cannot allocate memory|out of memory|Interrupt", re.IGNORECASE
)
# A line of a compiler's output (or the shell's) that says what went wrong.
_REASON = re.compile(r"error:|not found", re.IGNORECASE)


def _build_failure(error: Exception) -> str:
    """One line saying why the build failed. When a compile fails, torch's message begins with
    the compiler's command line (hundreds of characters, no reason in them); the reason is the
    first line of the compiler's output that reports an error, or a shell's "not found"."""
    first, *rest = str(error).splitlines() or [""]
    reason = next((line.strip() for line in rest if _REASON.search(line)), None)
    if reason is None:
        return f"{type(error).__name__}: {first}"
    return f"{type(error).__name__}: {first.split(': [', 1)[0]}: {reason}"


def build_error() -> str | None:
    """Why the kernels could not be built (None when they were, or were not tried)."""
    return _state["error"]


def disabled():
    """Within this context (this thread), quantization takes the PyTorch path."""
    return _disabled.on()


def usable(x: torch.Tensor) -> bool:
    """Whether a tensor can go through the fused kernels now."""
    return x.device.type == "cpu" and not _disabled and available()


def quantize_rows(
    x: torch.Tensor,
    block: int,
    *,
    block_rows: int = 1,
    integer: bool,
    mbits: int,
    emin: int,
    emax: int,
    fmt_max: float,
    rule: int,
    amax: torch.Tensor | None,
    noise_seed: int | torch.Tensor | None = None,
    fold: bool = False,
    hadamard: torch.Tensor | None = None,
    write_values: bool = True,
    measure_amax: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, scale, tensor_scale, folded, measured_amax)`` of a 2-D CPU tensor; see
    quantize.cpp.

    ``block``: the columns of a block, 0 for one scale for the whole tensor, `ROW_BLOCK` for one
    per row.
    ``noise_seed``: stochastic rounding with `lowbit.formats.counter_rng.uniforms` of that seed, an
    int or a 0-dim int64 tensor (`lowbit.formats.counter_rng.seed_tensor`'s; a traced graph keeps
    it a tensor, see `_define_traced_quantize_rows`).
    ``hadamard``: random signs; the rows are first transformed by `lowbit.formats.hadamard.transform`
    (zero-padded to whole blocks of its length), and the results have the padded columns.
    ``write_values=False`` (with ``fold``): ``values`` comes back empty, only ``folded`` is written.
    ``measure_amax`` (``block`` 0): ``measured_amax`` is max |x| (one fp32), taken in the rounding
    pass when ``amax`` is given; otherwise it comes back empty."""
    op = torch.ops.lowbit.quantize_rows
    if isinstance(noise_seed, torch.Tensor):
        if torch.compiler.is_compiling():
            op = torch.ops.lowbit_traced.quantize_rows
        else:
            noise_seed = int(noise_seed)
    return op(
        x,
        block,
        block_rows,
        int(integer),
        mbits,
        emin,
        emax,
        fmt_max,
        rule,
        amax,
        noise_seed,
        fold,
        hadamard,
        write_values,
        measure_amax,
    )


def _define_traced_quantize_rows() -> None:
    """``lowbit_traced::quantize_rows``: ``quantize_rows`` with its stochastic-rounding seed a
    0-dim int64 tensor, the op a traced graph (`torch.compile`, `torch.export`) calls. The C++
    op takes the seed as an int, and a graph cannot turn its tensor seed into one: Dynamo broke
    the graph there, in the backward of every layer with stochastic rounding (`mxfp4`, `nvfp4`),
    and so ran each such layer's autograd function eagerly. This op takes the int at run time,
    so the traced graph draws a new seed at every call, as eager does (the same bits). A namespace
    of its own: ``lowbit`` holds the C++ kernels, each with its fake in fake.py."""

    seed_at = 10  # noise_seed's place among quantize_rows' arguments (`_QUANTIZE_ROWS_SCHEMA`)

    def run(*args):
        seed = int(args[seed_at])
        return torch.ops.lowbit.quantize_rows(*args[:seed_at], seed, *args[seed_at + 1 :])

    op = torch.library.custom_op(
        "lowbit_traced::quantize_rows",
        run,
        mutates_args=(),
        schema=_QUANTIZE_ROWS_SCHEMA.replace("int? noise_seed", "Tensor noise_seed"),
    )
    op.register_fake(fake.quantize_rows)


# quantize.cpp's schema of ``quantize_rows`` (without its name).
_QUANTIZE_ROWS_SCHEMA = (
    "(Tensor x, int block, int block_rows, int kind, int mbits, int emin, int emax, float fmt_max, "
    "int rule, Tensor? amax, int? noise_seed, bool fold, Tensor? hadamard, bool write_values=True, "
    "bool measure_amax=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def scale_rows_cols(
    acc: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``((acc.float() * row[:, None]) * col[None, :]).to(out_dtype)`` in one pass (epilogue.cpp);
    ``acc`` int32, fp32 or bf16, ``out_dtype`` fp32 or bf16."""
    return torch.ops.lowbit.scale_rows_cols(acc, row, col, out_dtype)


def add_scaled_rows_cols_(
    out: torch.Tensor, acc: torch.Tensor, row: torch.Tensor, col: torch.Tensor
) -> torch.Tensor:
    """``out += (acc.float() * row[:, None]) * col[None, :]`` in one pass (epilogue.cpp); ``out``
    fp32 contiguous, ``acc`` int32, fp32 or bf16 with unit column stride."""
    torch.ops.lowbit.add_scaled_rows_cols_(out, acc, row, col)
    return out


def add_scaled_blocks_(
    out: torch.Tensor, partials: torch.Tensor, row: torch.Tensor, col: torch.Tensor
) -> torch.Tensor:
    """``out += sum_k (partials[k].float() * row[k][:, None]) * col[k][None, :]``, added in
    increasing k, in one pass (epilogue.cpp); ``out`` fp32 M x N contiguous, ``partials``
    K-blocks x M x N (int32, fp32 or bf16), ``row`` K-blocks x M, ``col`` K-blocks x N."""
    torch.ops.lowbit.add_scaled_blocks_(out, partials, row, col)
    return out


def int_rows_linear(
    qx: torch.Tensor,
    sx: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    w_max: float,
    w_rule: int,
    rounding: torch.dtype | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """An int8 layer's forward (lean_linear.cpp): ``weight``'s rows quantized to the integer format
    of largest value ``w_max`` by scale rule ``w_rule`` (`AxisQuantizer`'s), the int8 GEMM with
    the quantized input ``qx`` (rows scaled by ``sx``), the epilogue, ``bias``, then rounded to
    ``rounding`` (if given) and ``out_dtype``."""
    return torch.ops.lowbit.int_rows_linear(
        qx, sx, weight, bias, w_max, w_rule, rounding, out_dtype
    )


def cast_linear_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    needs: tuple[bool, bool, bool],
    grad_input_dtypes: tuple[torch.dtype, torch.dtype],
    grad_weight_dtypes: tuple[torch.dtype, torch.dtype],
    input_dtype: torch.dtype,
    weight_dtype: torch.dtype,
    bf16_gemms: bool,
) -> tuple:
    """``(grad_input, grad_weight, grad_bias)`` of a layer whose gradient GEMMs are plain casts
    (lean_linear.cpp; `lowbit.nn.gemm.cast_gemm` each), None where ``needs`` says no."""
    return torch.ops.lowbit.cast_linear_backward(
        grad_out,
        x,
        weight,
        *needs,
        *grad_input_dtypes,
        *grad_weight_dtypes,
        input_dtype,
        weight_dtype,
        bf16_gemms,
    )


def operand_stats(
    x: torch.Tensor,
    values: torch.Tensor,
    scale: torch.Tensor,
    saturation: float,
    subnormal_below: float = 0.0,
) -> torch.Tensor:
    """The `lowbit.diagnostics.stats.STATS` vector (float64, its scale entry 0) of ``x`` (fp32,
    bf16 or fp16) against ``values * scale`` (carrier values fp32, bf16, fp16 or int8, both
    contiguous; ``scale`` fp32, one or one per element), with ``saturation`` the format's largest
    value times (1 + 2**-20), in one pass (stats.cpp). Nonzero ``|x| < subnormal_below`` count
    as flushed too: an ``x`` already in its format's dtype holds what underflowed as subnormals."""
    return torch.ops.lowbit.operand_stats(x, values, scale, saturation, subnormal_below)
