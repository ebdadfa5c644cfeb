"""Checkpoints in ``<run>/checkpoints/step-NNNNNNN.pt``, written atomically, the last N kept.

A checkpoint is written to a temporary file in the same folder, flushed and fsynced, then renamed
over its final name with `os.replace` (atomic on POSIX); the folder is fsynced so the rename itself
survives a power cut. A crash mid-write leaves at most a ``.tmp`` file, which `latest` ignores and
the next save removes; the previous checkpoints are only deleted after the new one is in place.
Multi-process runs write ``step-NNNNNNN.dcp`` folders instead (`lowbit.distributed.checkpoint`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import zipfile
from pathlib import Path

import torch

from lowbit.errors import UsageError

FOLDER = "checkpoints"
_NAME = re.compile(r"^step-(\d+)\.(pt|dcp)$")


def path_for(run_dir, step: int, kind: str = "pt") -> Path:
    return Path(run_dir) / FOLDER / f"step-{step:07d}.{kind}"


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / FOLDER
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def step_of(path) -> int | None:
    """The step of a checkpoint named as `path_for` names it, else None."""
    found = _NAME.match(Path(path).name)
    return int(found[1]) if found else None


def latest(run_dir) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save(state: dict, run_dir, step: int, keep_last: int) -> Path:
    """Write ``state`` atomically as the checkpoint of ``step``; keep the newest ``keep_last``."""
    final = path_for(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob("*.tmp"):
        stale.unlink(missing_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if (refused := write_error(error)) is not None:
            raise refused from None
        raise
    _fsync_dir(final.parent)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        remove(old)
    return final


def write_error(error: BaseException) -> OSError | None:
    """The `OSError` that says why a checkpoint write failed with ``error`` (None where it is not
    the disk's): torch's zip writer, closed after a write failed (a full disk), raises "unexpected
    pos" in place of the OSError that says why."""
    if isinstance(error, OSError):
        return error
    if isinstance(error, RuntimeError) and isinstance(error.__context__, OSError):
        return error.__context__
    return None


def load(path) -> dict:
    if Path(path).is_dir():  # a multi-process (DCP) checkpoint, gathered into full tensors
        from lowbit.distributed.checkpoint import load_full

        return load_full(path)
    return read_file(path)


def read_file(path, name=None) -> dict:
    """``torch.load`` of a checkpoint file; a `UsageError` naming ``name`` (default: the file)
    when it cannot be read or holds something else."""
    name = Path(name or path)
    if changed := _changed_record(path):
        raise unreadable(
            name,
            f"its record {changed} fails its CRC-32 check: the file changed since it was saved",
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torn or foreign bytes fail in torch's reader or in unpickling
        problem = " ".join(str(error).split())
        # a file cut short: torch's words for it were "[Errno 22] Invalid argument", or a
        # paragraph on an "internal miniz error" (a missing file or a folder keeps its errno)
        if Path(path).is_file() and not zipfile.is_zipfile(path):
            problem = (
                "not a whole zip archive: cut short (an interrupted save or copy), or another "
                "kind of file"
            )
        raise unreadable(name, problem) from None
    if not isinstance(state, dict) or "step" not in state:
        raise unreadable(name, "not a lowbit checkpoint")
    return state


def read_settings(path) -> dict:
    """The checkpoint at ``path`` with its tensors mapped from the file, not read (a DCP folder's
    rank-0 part, which holds no weights, once its shard files are checked): its ``config`` and
    ``step``, for the refusals a resumed run makes before it builds its model. Its records other
    than the tensors' (the pickle that holds them: kilobytes) are checked against their CRC-32
    first: a byte changed there was read as another setting (a resume refused for a --task the
    user never changed). The tensors' are left to the full load (`read_file`), which checks them
    all: checked here too, a checkpoint of gigabytes was read once more on every resume. A
    checkpoint that fails, or cannot be mapped (torn, foreign, legacy non-zip bytes), is read by
    `read_file`, whose `UsageError` names the file, the problem and the checkpoint to go on from."""
    if Path(path).is_dir():
        from lowbit.distributed.checkpoint import read

        state = read(path)
    else:
        state = None
        if _changed_record(path, tensors=False) is None:
            with contextlib.suppress(Exception):  # `read_file` below names the problem
                state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        if not isinstance(state, dict) or "step" not in state:
            state = read_file(path)
    if "config" not in state:
        raise unreadable(Path(path), "not a lowbit checkpoint")
    return state


def _changed_record(path, tensors: bool = True) -> str | None:
    """The first record of the checkpoint's zip archive whose bytes no longer match the CRC-32
    that `torch.save` wrote beside them (a bit flipped on the disk, bytes overwritten), else None;
    ``tensors=False``: of its records other than the tensors' (``<archive>/data/<n>``) only.

    torch's reader does not check them: a tensor whose bytes changed loads without a word, and a
    run resumed from it trains on from other weights than it saved. A file that is not a zip
    archive (torn, or foreign) is left to torch's reader to say so."""
    try:
        with zipfile.ZipFile(path) as archive:
            if tensors:
                return archive.testzip()
            for record in archive.infolist():
                if "/data/" not in record.filename and _crc_fails(archive, record):
                    return record.filename
    except (zipfile.BadZipFile, OSError, EOFError):
        pass
    return None


def _crc_fails(archive: zipfile.ZipFile, record: zipfile.ZipInfo) -> bool:
    """Whether ``record``'s bytes fail their CRC-32 (`zipfile` raises at the end of a read)."""
    try:
        with archive.open(record) as f:
            while f.read(1 << 20):
                pass
    except zipfile.BadZipFile:
        return True
    return False


def unreadable(path: Path, problem: str) -> UsageError:
    """The error for a checkpoint that cannot be read. Runs use their newest checkpoint, so the
    fix for the newest is to move it away (not delete it: it may be worth a look), and it names
    the checkpoint used then."""
    found = list_checkpoints(path.parent.parent) if path.parent.name == FOLDER else []
    if found[-1:] != [path]:
        fix = "give another checkpoint"
    elif len(found) > 1:
        fix = f"move it out of {path.parent}, so that {found[-2].name} is the newest"
    else:
        run = path.parent.parent
        fix = (
            "it is the run's only checkpoint: move it away and start the run again "
            f"({restart_command(run)})"
        )
    return UsageError(f"{path}: unreadable checkpoint ({problem}); fix: {fix}")


def restart_command(run_dir) -> str:
    """The command that starts the run in ``run_dir`` again from its config.yaml, its paths quoted
    so that it pastes into a shell (a run folder's name may hold a space)."""
    run = Path(run_dir)
    config = shlex.quote(str(run / "config.yaml"))
    return f"lowbit train --config {config} --out {shlex.quote(str(run))}"


def is_checkpoint(path) -> bool:
    """``path`` is a one-process checkpoint file or a multi-process checkpoint folder (``.dcp``)."""
    path = Path(path)
    return path.is_file() or (path.suffix == ".dcp" and path.is_dir())


def run_of(path) -> Path | None:
    """The run folder whose ``checkpoints/`` holds the checkpoint ``path`` (a file or a ``.dcp``
    folder), None where ``path`` is no such checkpoint."""
    path = Path(path)
    run = path.parent.parent
    if path.parent.name == FOLDER and is_checkpoint(path) and (run / "config.yaml").is_file():
        return run
    return None


def first_changes(changes: list[str]) -> str:
    """The first three ``changes`` for a one-line message, "; ..." for the rest."""
    return "; ".join(changes[:3]) + ("; ..." if len(changes) > 3 else "")


def run_files_record(folder, config) -> dict[str, str]:
    """The sha256 of each file in ``folder`` (a run's, or an inference folder's copy of them)
    that the task of ``config`` saved beside its checkpoints and reads again at every load
    (`tasks.run_file_names`): a causal LM's tokenizer/ (lowbit_tokenizer.json, a Hugging Face
    tokenizer's files), a tagger's labels.json (and vocab.json, without a pretrained encoder); by
    path in the folder. run.json holds it as ``run_files`` (`check_run_files`)."""
    from lowbit.models.pretrained import file_hashes
    from lowbit.train.tasks import run_file_names

    return file_hashes(folder, run_file_names(config))


def run_files_changed(folder, recorded, config, removed: bool = True) -> list[str]:
    """The files of `run_files_record` in ``folder`` changed, added or removed since ``recorded``
    (an earlier `run_files_record` of them: a run's run.json, an inference folder's manifest), in
    `file_changes`' words; none where nothing was recorded (written before session 42: not
    checked). A name recorded that the task of ``config`` does not read is left out (a record
    of session 42 held a tagger's names for every task); so are those removed since, unless
    ``removed``."""
    from lowbit.models.pretrained import file_changes
    from lowbit.train.tasks import run_file_names

    if not isinstance(recorded, dict) or not recorded:
        return []
    now = run_files_record(folder, config)
    compared = set(run_file_names(config)) if removed else set(now)
    return file_changes({k: v for k, v in recorded.items() if k in compared}, now)


def check_run_files(run_dir, config, removed: bool = True) -> None:
    """Refuse the run in ``run_dir`` where a file its task (of ``config``) reads again at every
    load (its tokenizer, tags, vocabulary: `run_files_record`) changed since the run saved it:
    its checkpoints would be resumed, evaluated or exported on other token ids (or tag ids)
    without a word, as long as the counts still fit the embedding. ``removed=False``: a file
    removed since is left to the task's reader of it to name. A run whose run.json
    has no ``run_files`` (before session 42, or killed before it was written) is not checked."""
    from lowbit.train.config import read_run_info

    changes = run_files_changed(run_dir, read_run_info(run_dir).get("run_files"), config, removed)
    if not changes:
        return
    added = [change for change in changes if change.endswith(" added")]
    put_back = "put those back as they were (run.json's run_files holds their sha256)"
    if not added:
        fix = put_back
    elif len(added) == len(changes):
        fix = "remove it" if len(added) == 1 else "remove them"
    else:
        fix = f"remove those added and {put_back.replace('those', 'the others')}"
    raise UsageError(
        f"{run_dir}: the run's own files changed since it saved them ({first_changes(changes)}), "
        f"so its checkpoints would read other token or tag ids; fix: {fix}, or train a new run"
    )


def check_model_folder(run_dir) -> None:
    """Refuse to load the run in ``run_dir`` where the --model folder it trained from (recorded in
    its run.json) no longer builds the model its checkpoints hold: every load rebuilds the
    architecture from the folder's config.json and loads a checkpoint into it, and another
    rope_theta, hidden_act or context length loaded without a word, quantizing or exporting a
    model the run never trained. A token classifier reads its tokenizer from the folder too:
    other ids for the same words. Only the weights changed is fine (the checkpoint holds the
    trained ones); a run recorded before run.json held `model_record`, or a folder moved away
    (the load names it), is not checked. Loaders call it once the checkpoint is in the model (a
    shape that no longer fits is told by the load, naming the tensor); a resumed run before it
    builds its model (the folder's own weights may no longer fit its config).

    A causal-LM run from an encoder folder (BERT, RoBERTa, XLM) whose record lacks the fields
    that built it as a decoder (``as_decoder``) trained before lowbit built it so: its weights
    learned to attend both ways, and loaded into the causal model they evaluate, generate and
    export as another model, without a word (config.json unchanged, nothing above tells it)."""
    from lowbit.models.causal_lm import decoder_fields
    from lowbit.models.pretrained import model_changes
    from lowbit.models.token_classifier import MINILM_PACKAGE, package_folder
    from lowbit.train.config import read_run_info

    info = read_run_info(run_dir)
    folder, recorded = info.get("model_path"), info.get("model_record")
    package = not folder and bool(recorded)  # a --model minilm run's: the package installed now
    if package:
        folder = package_folder(info.get("task", "causal-lm"), "minilm")
    if not folder:
        return
    built_as_decoder = isinstance(recorded, dict) and recorded.get("as_decoder")
    causal = info.get("task", "causal-lm") == "causal-lm"
    if causal and not built_as_decoder and decoder_fields(folder):
        raise UsageError(
            f"{run_dir} was trained from encoder {folder} with attention in both directions "
            "(before lowbit built such models as decoders); its weights do not fit the causal "
            "model; fix: train a new run from the folder"
        )
    if not recorded:
        return
    changes = model_changes(recorded, folder, tokenizer=info.get("task") == "token-classification")
    if not changes:
        return
    shown = first_changes(changes)
    what, put_back = f"the --model folder {folder}", "put those back as they were"
    if package:
        name = MINILM_PACKAGE.replace("_", "-")  # as pip names it
        what = f"--model minilm's folder {folder} (package {name})"
        put_back = f"install the {name} version the run trained with"
    raise UsageError(
        f"{run_dir}: {what} changed since the run trained from it ({shown}), so its checkpoints "
        f"no longer fit the model the folder builds; fix: {put_back} (run.json's model_record "
        "holds the config the run trained from), or train a new run from the folder as it is now"
    )


def find(run_dir, checkpoint: str | None = None, note: bool = True) -> Path:
    """``checkpoint`` if given (a path; or, inside the run's checkpoint folder, a file name such as
    ``step-0000010.pt`` or a step number), else the run's latest; a `UsageError` when there is
    none. The latest of a run that did not finish (still training, killed, interrupted) is
    warned of, with ``note``: it was taken without a word, as if it were the trained model."""
    if checkpoint:
        path = Path(checkpoint)
        if is_checkpoint(path):
            return path
        inside = [Path(run_dir) / FOLDER / str(checkpoint)]
        if str(checkpoint).isdecimal():
            inside = [path_for(run_dir, int(checkpoint), kind) for kind in ("pt", "dcp")]
        found = next((p for p in inside if is_checkpoint(p)), None)
        if found is None:
            steps = [step_of(p) for p in list_checkpoints(run_dir)]
            have = f" (the run has steps {', '.join(map(str, steps))})" if steps else ""
            raise UsageError(
                f"{checkpoint}: no such checkpoint{have}; fix: a checkpoint's path, its file "
                "name in the run's checkpoints folder, or its step number"
            )
        return found
    path = latest(run_dir)
    if path is None and (Path(run_dir) / "model.safetensors").is_file():
        # a quantized or pruned folder that lost its manifest: "train first" sent the user astray
        raise UsageError(
            f"{run_dir}: no checkpoint in {FOLDER}/, and model.safetensors without the "
            "quantization.json that lowbit quantize/prune write beside it; fix: copy "
            "quantization.json back, or quantize/prune the source run again"
        )
    if path is None:
        # a run that stopped before its first save starts again from its own settings: `lowbit
        # train --out RUN` alone trained the default task there, or was refused
        again = (
            restart_command(run_dir)
            if (Path(run_dir) / "config.yaml").is_file()
            else f"lowbit train --out {shlex.quote(str(run_dir))}"
        )
        raise UsageError(f"{run_dir}: no checkpoint in {FOLDER}/; fix: train first ({again})")
    if note:
        from lowbit.train.runstate import note_unfinished

        note_unfinished(run_dir, path)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
