"""A training run's settings: `TrainConfig`, loaded from a YAML/TOML file and overridden by flags.

Fields left at ``None`` take their task's default in `resolve` (see `TASK_DEFAULTS`); the resolved
config is what the run folder records in ``config.yaml`` and what ``--resume`` reads back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import re
import shlex
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from lowbit.errors import UsageError, check_given, choose, warn

TASKS = ("causal-lm", "token-classification", "image-classification")
TOKENIZERS = ("byte", "bpe")
CONFIG_SUFFIXES = (".yaml", ".yml", ".toml", ".json")

# Per-task defaults: the default `lowbit train` (causal-lm, tiny, bf16-mixed) takes ~2 minutes on
# 2 CPU cores (about 0.25 s per step of 16 x 256 tokens) and brings validation loss from 5.6 to ~2.
TASK_DEFAULTS: dict[str, dict] = {
    "causal-lm": {
        "batch_size": 16,
        "seq_len": 256,
        "lr": 3e-3,
        "steps": 400,
        "warmup_steps": 20,
        "eval_interval": 100,
        "weight_decay": 0.1,
    },
    "token-classification": {
        "batch_size": 32,
        "seq_len": 64,
        "lr": 1e-3,
        "steps": 300,
        "warmup_steps": 20,
        "eval_interval": 100,
        "weight_decay": 0.01,
    },
    "image-classification": {
        "batch_size": 64,
        "seq_len": None,
        "lr": 3e-3,
        "steps": 300,
        "warmup_steps": 10,
        "eval_interval": 100,
        "weight_decay": 0.0,
    },
}


@dataclass
class TrainConfig:
    """Everything that defines a run. ``None`` means "the task's default" until `resolve`."""

    task: str = "causal-lm"
    model: str = "tiny"
    recipe: str = "bf16-mixed"
    data: str | None = None  # None: the built-in data of the task
    text_field: str = "text"
    tokenizer: str = "byte"
    vocab_size: int = 2048  # BPE only
    steps: int | None = None
    epochs: float | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    lr: float | None = None
    min_lr: float | None = None  # default lr / 10
    warmup_steps: int | None = None
    weight_decay: float | None = None
    optimizer_state: str = "fp32"  # AdamW state precision (lowbit.optim.STATE_PRECISIONS)
    grad_accum: int = 1
    grad_clip: float | None = 1.0  # 0 or None: measure the norm only
    seed: int = 0
    eval_interval: int | None = None
    eval_batches: int = 8
    save_interval: int | None = None  # default: eval_interval
    keep_last: int = 2
    out: str | None = None
    device: str = "auto"
    wandb: bool = False
    nproc: int = 1  # processes (ranks) of a multi-process run; under torchrun its world size
    strategy: str | None = None  # None: one process; "ddp" or "fsdp" (lowbit.distributed)
    stats_interval: int = 0  # steps between per-operand numerics statistics; 0: off
    overrides: list[str] = field(default_factory=list)  # PATTERN=WHAT (recipes.parse_override)
    loss_scale: float | None = None  # the recipe's initial (or static) loss scale instead
    loss_scale_growth_interval: int | None = None  # the recipe's growth interval instead
    # recompute each block's activations in the backward (Hugging Face models): less memory, the
    # same numbers, so a resumed run may turn it on or off
    activation_checkpointing: bool = False

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def flag_of(name: str) -> str:
    """The `lowbit train` flag that gives setting ``name``: ``--name-with-dashes``, and
    ``--override`` (once per entry) for the list ``overrides``."""
    return "--override" if name == "overrides" else f"--{name.replace('_', '-')}"


def spelled_none(name: str, task: str | None) -> str | None:
    """The value of flag ``--name`` that `resolve` stores as None in setting ``name``, where one
    does: grad_clip's 0 (measure the norm only), causal-lm's data ``stdlib`` (the built-in data;
    token classification's --data takes no such name); None for a setting whose None no flag
    gives (no --override)."""
    if name == "grad_clip":
        return "0"
    if name == "data" and task == "causal-lm":
        return "stdlib"
    return None


def load_file(path, flags=(), command=None) -> dict:
    """The settings in a YAML, TOML or JSON file; a malformed file, or one with a setting
    `TrainConfig` does not have (a typo), raises a one-line `UsageError`. A run folder's
    config.yaml gives only the settings the run was given (`given_settings`).

    ``command``: ``(name, args)`` of the command that reads the file (``"lowbit doctor"``, its
    parsed `argparse.Namespace`): a key that is one of its own flags, not a setting
    (``overwrite``, ``probe_steps``), is refused as such, where its fix read "did you mean
    'overrides'?" ('steps' for ``probe_steps``: the run's length, not the probe's).

    ``flags`` names the settings given on the command line, which replace the file's (`merge`;
    a dict maps a name to the flag that gives it where that is not ``--name``):
    a file's value of the wrong type that one of them replaces is left out with a warning, not
    refused, as the run never reads it (``lr: fast`` beside ``--lr 1e-3``); the warning keeps the
    mistake from going unnoticed by the runs that read the file without the flag."""
    settings, blank = _file_settings(path)
    settings = _without_replaced_mistypes(path, settings, flags, blank)
    unknown = _unknown_setting(settings)
    if unknown and (fix := _other_files_fix(Path(path), settings)):
        raise UsageError(f"{path}: {fix}")
    if unknown and isinstance(settings[unknown], dict):  # a [train] table, a `train:` block
        raise UsageError(
            f"{path}: {unknown!r} is a section, and settings are not read from sections; fix: "
            f"write its settings at the top level of the file, without {unknown!r}"
        )
    # the Namespace's own entries that are no flag: `lowbit.cli.build_parser`'s subcommand
    # ("command") and the function it runs ("run")
    if unknown and command is not None and unknown in set(vars(command[1])) - {"command", "run"}:
        flag = f"--{unknown.replace('_', '-')}"
        raise UsageError(
            f"{path}: {unknown!r} is a {command[0]} flag, not a setting of the run the file "
            f"describes; fix: give {flag} on the command line, not in the file"
        )
    if unknown:
        names = TrainConfig.field_names()
        # a typo's setting named first: in the list of every setting it was easy to miss
        nearest = difflib.get_close_matches(unknown.lower(), names, n=1)
        if nearest:
            raise UsageError(
                f"{path}: unknown setting {unknown!r}; fix: did you mean {nearest[0]!r}? "
                f"(the settings: {', '.join(names)})"
            )
        raise UsageError(f"{path}: unknown setting {unknown!r}; fix: use one of {', '.join(names)}")
    valueless = [] if is_run_config(path) else _valueless(settings, blank)  # a run's: its record
    if valueless:
        raise UsageError(f"{path}: {_without_value(valueless, blank)}")
    try:  # flags are typed by argparse: a wrong type is the file's, which the error must name
        built = build_config(settings)
    except UsageError as error:
        raise UsageError(f"{path}: {error}") from None
    if "data" in settings and "data" not in flags and not is_run_config(path):
        _check_data_beside(path, built.data)
    if is_run_config(path):
        given = given_settings(built)
        settings = {name: value for name, value in settings.items() if name in given}
        # a relative data path or model folder names files from the folder the run was started
        # in: read from another folder, a repeat of the run trained on other data (or none)
        recorded = with_recorded_data(Path(path).parent, built)
        for name in ("data", "model"):
            if name in settings:
                settings[name] = getattr(recorded, name)
    return settings


def _other_files_fix(path: Path, settings: dict) -> str | None:
    """What the file at ``path``, which holds keys no setting has, is and the fix, where it is
    another file lowbit reads: a Hugging Face model config (``--model``'s) or a run folder's
    run.json. They were told "unknown setting 'architectures'" and the list of settings."""
    if "model_type" in settings or "architectures" in settings:
        model = shlex.quote(str(path.parent if path.name == "config.json" else path))
        return (
            "a Hugging Face model config, not training settings; fix: --model "
            f"{model} to train that model (--config takes a file of training settings)"
        )
    if path.name == RUN_INFO and (path.parent / "config.yaml").is_file():
        config = shlex.quote(str(path.parent / "config.yaml"))
        return f"a run's record, not its settings; fix: --config {config}, the run's settings"
    return None


def _check_data_beside(path, data: str | None) -> None:
    """Refuse a relative ``data`` of the config file ``path`` that names nothing from the working
    folder, where relative paths are read from (as on the command line), but names data beside
    the file: "no such file" did not say that the path was not read from the file's folder."""
    import glob

    if data in (None, "stdlib") or Path(os.path.expanduser(data)).is_absolute():
        return
    if os.path.lexists(data):  # found as spelt: a `[` in its name is no glob's (`data[1].txt`)
        return
    beside = Path(path).parent / data
    if glob.glob(data) or not glob.glob(str(beside)):
        return
    raise UsageError(
        f"{path}: data {data!r} does not exist in the working folder {Path.cwd()}, which a "
        f"relative path is read from, not the file's folder; fix: data: "
        f"{os.path.relpath(beside)} (or an absolute path) in the file"
    )


def _without_replaced_mistypes(path, settings: dict, flags, blank: set[str]) -> dict:
    """``settings`` less those of the wrong type, or without a value (`_valueless`), that
    ``flags`` replace, each warned about."""
    kept = dict(settings)
    valueless = [] if is_run_config(path) else _valueless(settings, blank)
    for name in sorted(_replaced(flags) & settings.keys()):
        try:
            if name in valueless:
                raise UsageError(_without_value([name], blank))
            build_config({name: settings[name]})
        except UsageError as error:
            problem = str(error).partition("; fix:")[0]
            flag = next(f for f in (name, "steps", "epochs") if f in flags)  # `_replaced`'s
            # a command's own spelling where it gives one (compare sets the seed by --first-seed)
            spelled = flags.get(flag) if isinstance(flags, dict) else None
            flag = spelled or flag_of(flag)
            warn(
                f"{path}: {problem}; ignored, as {flag} replaces it; fix: correct it in the file, "
                f"which a run without {flag} refuses"
            )
            del kept[name]
    return kept


# Settings whose null a run's config.yaml records, a value of its own, and what it means. Read
# back from a file (the run's, or a copy of it), null means that again.
_RECORDED_NULLS = {
    "data": "the built-in data",
    "grad_clip": "no clipping",  # as --grad-clip 0
    "strategy": "one process",
    "loss_scale": "the recipe's loss scaling",
    "loss_scale_growth_interval": "the recipe's growth interval",
}


def _valueless(settings: dict, blank: set[str]) -> list[str]:
    """The names, in file order, of a config file's ``settings`` left without a value (``steps:``,
    JSON's null) where null is no value of its own: a blank left to fill in, refused. ``steps:``
    ran the task's 400 steps without a word, where ``wandb:`` or ``recipe:`` were refused. Null is
    kept where a run's config.yaml records it (`_RECORDED_NULLS`; the one of steps and epochs
    that does not give the run's length; the digits' seq_len), so a run's settings read back,
    but only written out: the ``blank`` names, a YAML ``grad_clip:`` with nothing after it, are
    refused there too, as a run never writes one (a user's ``grad_clip:`` was meant to be filled
    in, and ran without clipping)."""
    kept = set(_RECORDED_NULLS)
    if settings.get("epochs") is not None:
        kept.add("steps")
    if settings.get("steps") is not None:
        kept.add("epochs")
    if settings.get("task") == "image-classification":  # no sequences: resolve leaves it None
        kept.add("seq_len")
    return [
        name
        for name, value in settings.items()
        if value is None and (name not in kept or name in blank)
    ]


def _without_value(names: list[str], blank=(), toml: bool = False) -> str:
    """The refusal of settings ``names`` given without a value: "(null)" where each was written
    so (JSON's null, YAML's ``key: null``), nothing where one of them is ``blank``, left empty
    (YAML's ``key:``, TOML's ``key =``). Its fix names the values of a setting whose null means
    something (`_RECORDED_NULLS`), as the file spells them (``toml``: ``key = 0``, and no null):
    of a blank ``grad_clip:`` it said "give it one", not that ``grad_clip: null`` (or 0) is no
    clipping."""
    spelled = "" if set(names) & set(blank) else " (null)"
    means = []
    for name in names:
        setting = name.replace("-", "_")  # a TOML key as spelled
        meaning = _RECORDED_NULLS.get(setting)
        values = [v for v in (None if toml else "null", spelled_none(setting, None)) if v]
        if meaning and values:
            written = " or ".join(f"{name}{' =' if toml else ':'} {value}" for value in values)
            means.append(f"{written} for {meaning}")
    also = f" ({'; '.join(means)})" if means else ""
    if len(names) == 1:
        fix = f"give it one{also}, or leave the setting out for its default"
        return f"{names[0]} has no value{spelled}; fix: {fix}"
    return (
        f"{', '.join(names)} have no value{spelled}; fix: give each one{also}, or leave them out "
        "for their defaults"
    )


def _blank_value(text: str, error: Exception) -> tuple[int, str] | None:
    """``(line, key)`` where the TOML or JSON parser's ``error`` is at a key left without a value
    (``steps =``, ``"steps": ,``): TOML has no null, and "malformed config (Invalid value (at line
    3, column 8))" did not say that the value was missing, nor which."""
    line, column = getattr(error, "lineno", None), getattr(error, "colno", None)  # json
    if line is None and (at := re.search(r"at line (\d+), column (\d+)", str(error))):  # tomllib
        line, column = int(at[1]), int(at[2])
    if line is None or not 0 < line <= len(lines := text.splitlines()):
        return None
    before, after = lines[line - 1][: column - 1], lines[line - 1][column - 1 :]
    key = re.search(r'(?:^|[{,])\s*(?:"([^"]+)"|([A-Za-z0-9_-]+))\s*[:=]\s*$', before)
    ends = re.fullmatch(r"\s*([#,}].*)?", after)  # a comment, the next key, the mapping's end
    return (line, key[1] or key[2]) if key and ends else None


def _unknown_setting(settings: dict) -> str | None:
    """The first (alphabetically) of ``settings``' names that `TrainConfig` does not have."""
    return min(set(settings) - set(TrainConfig.field_names()), default=None)


def _file_settings(path) -> tuple[dict, set[str]]:
    """The settings of `load_file`, any names: keys with ``-`` spelled with ``_``; and the names
    of those left blank (YAML's ``key:`` with no value, not ``key: null``: `_valueless`)."""
    path = Path(path)
    if (path / "config.yaml").is_file():  # a run folder (was: "no such config file")
        fix = f"--config {shlex.quote(str(path / 'config.yaml'))}, the run's settings"
        raise UsageError(f"{path}: a run folder, not a config file; fix: {fix}")
    if path.is_dir():  # was "no such config file" of a folder that exists
        raise UsageError(
            f"{path}: a folder, not a config file; fix: --config FILE, a "
            f"{', '.join(CONFIG_SUFFIXES)} file of settings"
        )
    if not path.is_file():
        raise UsageError(f"{path}: no such config file; fix: check the path")
    suffix = path.suffix.lower()  # RUN.YAML, as some editors and systems name files
    if suffix not in CONFIG_SUFFIXES:
        raise UsageError(
            f"{path}: unknown config type {path.suffix!r}; fix: use {', '.join(CONFIG_SUFFIXES)}"
        )
    from lowbit.data.corpus import read_text

    # as --data is read: a byte order mark (Windows editors write one) is no part of the settings,
    # and a file in another encoding is told by its byte, line and the iconv that converts it
    text = read_text(path, or_else=None)  # not "or remove it": the settings are in it
    blank: set = set()  # JSON and TOML have no blank that parses (`_blank_value`)
    try:
        if suffix == ".toml":  # refuses a key given twice itself
            import tomllib

            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text, object_pairs_hook=_once_each(path)) if text.strip() else {}
        else:
            data, blank = _yaml_once_each(path, text)
    except UsageError:
        raise
    except Exception as error:  # each parser has its own error class; all mean "malformed"
        if suffix in (".toml", ".json") and (at := _blank_value(text, error)):  # YAML: null
            line, key = at
            refusal = _without_value([key], [key], toml=suffix == ".toml")
            raise UsageError(f"{path}: line {line}: {refusal}") from None
        raise UsageError(
            f"{path}: malformed config ({_one_line(error)}); fix: correct it"
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(
            f"{path}: a config is a mapping of settings; fix: write 'key: value' lines"
        )
    spellings: dict[str, str] = {}  # setting -> the key that gave it
    for key in map(str, data):
        name = key.replace("-", "_")
        if name in spellings:  # eval-interval and eval_interval: the later one silently won
            raise UsageError(
                f"{path}: {spellings[name]!r} and {key!r} are the same setting; fix: keep one"
            )
        spellings[name] = key
    settings = {str(k).replace("-", "_"): v for k, v in data.items()}
    return settings, {key.replace("-", "_") for key in blank}


def _given_twice(path, key, where: str = "") -> UsageError:
    """The refusal of a key a file gives twice: YAML and JSON parsers keep the later value without
    a word, so of two ``lr:`` lines the first, perhaps the one the user edited, was ignored."""
    return UsageError(f"{path}: {key!r} is given twice{where}; fix: keep one")


def _once_each(path):
    """A `json.loads` ``object_pairs_hook`` that refuses a key given twice (`_given_twice`)."""

    def pairs_to_dict(pairs):
        data = {}
        for key, value in pairs:
            if key in data:
                raise _given_twice(path, key)
            data[key] = value
        return data

    return pairs_to_dict


def _yaml_once_each(path, text: str) -> tuple[object, set[str]]:
    """``text`` parsed as YAML, refusing a key given twice in a mapping (`_given_twice`); and the
    top-level keys given no value at all (``key:``), which YAML reads as null as it does
    ``key: null``."""
    import yaml

    blank: set[str] = set()

    class Loader(yaml.SafeLoader):
        def construct_document(self, node):
            if isinstance(node, yaml.MappingNode):
                for key_node, value_node in node.value:
                    if value_node.tag == "tag:yaml.org,2002:null" and value_node.value == "":
                        blank.add(str(key_node.value))
            return super().construct_document(node)

        def construct_mapping(self, node, deep=False):
            lines: dict = {}  # key -> the line that gave it
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                with contextlib.suppress(TypeError):  # unhashable: the parser's own error
                    if key in lines:
                        where = f" (lines {lines[key]} and {key_node.start_mark.line + 1})"
                        raise _given_twice(path, key, where)
                    lines[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=Loader), blank  # a SafeLoader: it builds no Python objects


def _one_line(error: Exception) -> str:
    mark = getattr(error, "problem_mark", None)  # PyYAML
    if mark is not None:
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        return f"{where}: {getattr(error, 'problem', None) or error}"
    lineno = getattr(error, "lineno", None)  # json
    if lineno is not None and hasattr(error, "msg"):
        return f"line {lineno}, column {error.colno}: {error.msg}"
    return " ".join(str(error).split())


def merge(settings: dict, overrides: dict) -> dict:
    """``settings`` updated by ``overrides``.

    A run's length is one setting, given as steps or as epochs: an override of either replaces both
    (``--epochs`` over a config file's or a resumed run's ``steps``)."""
    replaced = _replaced(overrides)
    return {k: v for k, v in settings.items() if k not in replaced} | overrides


def _replaced(names) -> set[str]:
    """The settings that overrides of ``names`` replace: their own, and both of steps and epochs
    where either is one (`merge`)."""
    names = set(names)
    return names | ({"steps", "epochs"} if names & {"steps", "epochs"} else set())


def build_config(file_settings: dict | None = None, overrides: dict | None = None) -> TrainConfig:
    """A `TrainConfig` from file settings, then the flags that were given (not ``None``)."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    config = TrainConfig(**merge(file_settings or {}, given))
    _check_types(config)
    return config


_NUMBER_FIELDS = {
    "steps": int,
    "batch_size": int,
    "seq_len": int,
    "warmup_steps": int,
    "grad_accum": int,
    "seed": int,
    "eval_interval": int,
    "eval_batches": int,
    "save_interval": int,
    "keep_last": int,
    "vocab_size": int,
    "epochs": float,
    "lr": float,
    "min_lr": float,
    "weight_decay": float,
    "grad_clip": float,
    "nproc": int,
    "stats_interval": int,
    "loss_scale": float,
    "loss_scale_growth_interval": int,
}


_BOOL_FIELDS = ("wandb", "activation_checkpointing")
_STRING_FIELDS = ("task", "model", "recipe", "tokenizer", "device", "text_field", "optimizer_state")
_OPTIONAL_STRING_FIELDS = ("out", "strategy")


def _check_types(config: TrainConfig) -> None:
    """Check the type of every setting (a config file can hold anything) and convert numbers;
    paths given as `os.PathLike` (a `pathlib.Path` in Python) become strings, and a run folder or
    model folder starting with ``~`` is under the home folder, as --data's is: the shell expands
    a flag's ``~``, not a config file's, and ``out: ~/runs/x`` wrote a folder named ``~``."""
    for item in fields(config):
        # a key left without a value (``seed:``) is null: where None means nothing (its default is
        # not None; grad_clip's None is "measure only"), the run failed on it with a traceback
        meaningless = item.default is not None and item.name != "grad_clip"
        if meaningless and getattr(config, item.name) is None:
            raise UsageError(_without_value([item.name]))
    for name in ("data", "out", "model"):
        if isinstance(getattr(config, name), os.PathLike):
            setattr(config, name, os.fspath(getattr(config, name)))
    for name in ("out", "model"):
        if isinstance(getattr(config, name), str):
            setattr(config, name, os.path.expanduser(getattr(config, name)))
    for name, kind in _NUMBER_FIELDS.items():
        value = getattr(config, name)
        if value is None:
            continue
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if kind is int:
            ok = ok and float(value).is_integer()
        if not ok or not math.isfinite(value):
            raise UsageError(
                f"{name} must be a{'n integer' if kind is int else ' number'}, "
                f"got {value!r}; fix: correct it"
            )
        setattr(config, name, kind(value))
    for name in _BOOL_FIELDS:
        value = getattr(config, name)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            setattr(config, name, value.lower() == "true")
        if not isinstance(getattr(config, name), bool):
            raise UsageError(f"{name} must be true or false, got {value!r}; fix: correct it")
    if config.data is not None and not isinstance(config.data, str):
        raise UsageError(
            f"data must be one path or glob, got {config.data!r}; fix: give one folder or glob "
            "that holds all the files (e.g. 'texts/*.txt')"
        )
    for name in _STRING_FIELDS + _OPTIONAL_STRING_FIELDS:
        value = getattr(config, name)
        if not isinstance(value, str) and not (value is None and name in _OPTIONAL_STRING_FIELDS):
            raise UsageError(f"{name} must be a string, got {value!r}; fix: quote it")
    for name in ("data", *_STRING_FIELDS, *_OPTIONAL_STRING_FIELDS):
        # an unset shell variable (--data "$CORPUS"): as a path, "" is the current folder, whose
        # files a run would train on (or, as --out, write and --overwrite into)
        if isinstance(getattr(config, name), str):
            fix = f"give a value, or drop {flag_of(name)} for the default"
            check_given(getattr(config, name), name, fix)
    if isinstance(config.overrides, str):
        config.overrides = [config.overrides]
    if not isinstance(config.overrides, list | tuple) or not all(
        isinstance(o, str) for o in config.overrides
    ):
        raise UsageError(
            f"overrides must be a list of PATTERN=WHAT, got {config.overrides!r}; fix: e.g. "
            "overrides: ['lm_head=fp32'] in the file, or --override lm_head=fp32"
        )
    config.overrides = list(config.overrides)


def _check_tokenizer(name: str) -> None:
    """``name`` is one of `TOKENIZERS`; a path (a user's own tokenizer folder, or its
    tokenizer.json) is refused with where such a tokenizer is read from: a --model folder."""
    if name not in TOKENIZERS and os.path.exists(os.path.expanduser(name)):
        raise UsageError(
            f"--tokenizer {name}: takes byte or bpe, not a tokenizer of your own; fix: copy its "
            "files (tokenizer.json, tokenizer_config.json, ...) beside the config.json of the "
            "model to train in one folder and give --model DIR, whose tokenizer the run reads"
        )
    choose("tokenizer", name, TOKENIZERS, fix="--tokenizer byte, or bpe to learn one from the data")


def _process_counts(batch: int, nproc: int) -> str:
    """The process counts nearest ``nproc`` that split the global ``batch`` evenly, as a fix:
    ``--nproc 2 or 4`` for 8 over 3 (under torchrun its own flag, which refuses ``--nproc``).
    "Use a multiple of 3" was no fix for a resume, which keeps the run's batch size and may change
    only --nproc. The divisors come in pairs up to the square root of ``batch`` (a loop up to
    --nproc 300000000 took 29 s)."""
    from lowbit.distributed.launch import process_count_flag

    small = [n for n in range(1, math.isqrt(batch) + 1) if batch % n == 0]
    divisors = sorted({*small, *(batch // n for n in small)})
    below = max(n for n in divisors if n < nproc)
    above = min((n for n in divisors if n > nproc), default=None)
    counts = f"{below}" + (f" or {above}" if above is not None else "")
    return process_count_flag().format(counts)


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill the task defaults in and check every value; returns a new config."""
    out = dataclasses.replace(config)
    _check_types(out)  # a TrainConfig made in Python has not been through `build_config`
    choose("task", out.task, TASKS, fix=f"--task {TASKS[0]}, or another of those")
    _check_tokenizer(out.tokenizer)
    from lowbit.optim.states import state_precision

    state_precision(out.optimizer_state)  # an unknown one: refused, naming --optimizer-state
    defaults = TASK_DEFAULTS[out.task]
    if out.seq_len is None and out.task == "causal-lm":
        # a --model folder of fewer positions than the default: its own, in a note (train,
        # compare and doctor alike; a resume keeps the length its run recorded)
        from lowbit.models.causal_lm import SIZES, default_seq_len, model_positions

        # a --model path that is not there is refused later, naming it (a config file's
        # `model: ~/models/m` is checked here only for what it expands to)
        found = out.model in SIZES or Path(os.path.expanduser(out.model)).exists()
        positions = model_positions(out.model) if found else None
        out.seq_len = default_seq_len(defaults["seq_len"], positions, "--seq-len")
    for name in ("batch_size", "seq_len", "lr", "warmup_steps", "eval_interval", "weight_decay"):
        if getattr(out, name) is None:
            setattr(out, name, defaults[name])
    if out.steps is not None and out.epochs is not None:
        raise UsageError("both steps and epochs are set; fix: give only one of --steps/--epochs")
    if out.steps is None and out.epochs is None:
        out.steps = defaults["steps"]
    if out.min_lr is None:
        out.min_lr = out.lr / 10
    if out.save_interval is None:
        out.save_interval = out.eval_interval
    if out.grad_clip == 0:
        out.grad_clip = None
    if out.nproc > 1 and out.strategy is None:
        out.strategy = "ddp"
    if out.strategy is not None:
        choose("strategy", out.strategy, ("ddp", "fsdp"), fix="--strategy ddp or fsdp")
        if out.nproc > 0 and out.batch_size > 0 and out.batch_size % out.nproc:
            raise UsageError(
                f"batch size {out.batch_size} (the global batch) does not split evenly over "
                f"{out.nproc} processes; fix: {_process_counts(out.batch_size, out.nproc)} (a "
                f"divisor of {out.batch_size}), or in a new run a --batch-size that is a multiple "
                f"of {out.nproc} (a resume keeps the run's)"
            )
    positive = ["batch_size", "grad_accum", "eval_interval", "eval_batches", "save_interval"]
    positive += ["keep_last", "steps"] if out.steps is not None else ["keep_last"]
    if out.seq_len is not None:
        positive.append("seq_len")
    if out.nproc <= 0:  # a count of processes, not a size to raise: say which, and the bounds
        raise UsageError(
            f"--nproc must be positive, got {out.nproc}; fix: --nproc 1 or more (at most the "
            "GPUs, or the CPU cores where there are none)"
        )
    for name in positive:
        if getattr(out, name) <= 0:
            raise UsageError(f"{name} must be positive, got {getattr(out, name)}; fix: raise it")
    if out.epochs is not None and out.epochs <= 0:
        raise UsageError(f"epochs must be positive, got {out.epochs}; fix: raise it")
    if not 0 <= out.seed < 2**32:  # NumPy's generator, which every run seeds, takes these
        raise UsageError(f"seed must be in [0, 2**32), got {out.seed}; fix: e.g. --seed 0")
    for name in ("lr", "min_lr", "warmup_steps", "weight_decay", "stats_interval", "grad_clip"):
        value = getattr(out, name)
        if value is not None and not (0 <= value < math.inf):
            raise UsageError(
                f"{name} must be a finite number of at least 0, got {value}; fix: give one, or "
                f"leave {flag_of(name)} out for its default"
            )
    recipe_of(out)  # an unknown recipe or a malformed override fails before anything runs
    if out.min_lr > out.lr:
        raise UsageError(f"min_lr {out.min_lr} is above lr {out.lr}; fix: lower --min-lr")
    if out.data is not None and out.task == "image-classification":
        raise UsageError("image-classification trains on the built-in digits; fix: drop --data")
    if out.activation_checkpointing and out.task == "image-classification":
        raise UsageError(
            "activation checkpointing needs a Hugging Face model (it recomputes each transformer "
            "block), and image-classification trains a CNN; fix: drop --activation-checkpointing"
        )
    if out.out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out.out = str(Path("runs") / f"{out.task}-{out.recipe}-{stamp}")
    return out


def derived_settings(config: TrainConfig) -> list[str]:
    """The settings of ``config``, a resolved config (a run's config.yaml), that hold what
    `resolve` derives from its other settings: a task's default, ``min_lr`` = lr / 10,
    ``save_interval`` = eval_interval. A value the user gave that equals its derivation is
    counted too, as the config does not say which it was: derived again, it comes out the same."""
    derived = [
        name
        for name, default in TASK_DEFAULTS.get(config.task, {}).items()
        if default is not None and getattr(config, name) == default
    ]
    if config.lr is not None and config.min_lr == config.lr / 10:
        derived.append("min_lr")
    if config.save_interval is not None and config.save_interval == config.eval_interval:
        derived.append("save_interval")
    return derived


def given_settings(config: TrainConfig) -> dict:
    """The settings of a run's resolved config to build another config on (``--resume``, or
    ``--config RUN/config.yaml``), less its derived ones (`derived_settings`): `resolve` derives
    them again, the same from the same settings (a resumed run computes what it did), and from a
    changed --lr, --eval-interval or --task what a fresh run derives. Kept, the recorded values
    ignored the change: a min_lr of the old lr stayed (and one above a lower --lr was refused, as
    if the user had set it), and so did a save_interval of the old eval_interval."""
    derived = derived_settings(config)
    return {name: value for name, value in config.to_dict().items() if name not in derived}


# Settings that only some tasks read (the others ignore them): name -> the tasks that read it.
_TASK_SETTINGS = {
    "seq_len": ("causal-lm", "token-classification"),
    "text_field": ("causal-lm",),
    "tokenizer": ("causal-lm",),
    "vocab_size": ("causal-lm",),
}


def ignored_settings(config: TrainConfig) -> list[str]:
    """One line per setting of a resolved config, set away from its default, that the run does not
    read (``--seq-len`` for image classification; ``--vocab-size`` without the BPE tokenizer;
    ``--tokenizer`` for a model folder that brings its own; ``--text-field`` without JSONL data):
    the trainer warns about them rather than let a user believe they took effect."""
    from lowbit.train.tasks import model_tokenizer_file

    default = TrainConfig()
    own_tokenizer = model_tokenizer_file(config.model) if config.task == "causal-lm" else None
    lines = []
    for name in _TASK_SETTINGS:
        value = getattr(config, name)
        if value is None or value == getattr(default, name):
            continue
        flag = f"{name} ({flag_of(name)})"
        if config.task not in _TASK_SETTINGS[name]:
            lines.append(f"{flag} does not apply to task {config.task}; ignored")
        elif name in ("tokenizer", "vocab_size") and own_tokenizer is not None:
            lines.append(
                f"{flag} does not apply to model {config.model}, which brings its own tokenizer "
                f"({own_tokenizer.name}); ignored"
            )
        elif name == "vocab_size" and config.tokenizer != "bpe":
            lines.append(f"{flag} applies to --tokenizer bpe only, not {config.tokenizer}; ignored")
        elif name == "text_field" and (without := without_jsonl(config.data)):
            lines.append(f"{flag} applies to JSONL data only, and {without}; ignored")
    return lines


def without_jsonl(data: str | None) -> str | None:
    """Why ``data`` is read without JSONL records, where that is certain; None where it may hold
    some (a .jsonl file, a glob, a path that does not exist and fails later)."""
    from lowbit.data.corpus import FOLDER_SUFFIXES, JSONL_SUFFIXES

    if data in (None, "stdlib"):
        return "the run reads the built-in standard library"
    path = Path(os.path.expanduser(data))
    if path.is_dir():
        return (
            f"folder {data} is read for its {'/'.join(FOLDER_SUFFIXES)} files (a glob such as "
            f"'{(path / '*.jsonl').as_posix()}' reads JSONL files)"
        )
    if path.is_file() and path.suffix.lower() not in JSONL_SUFFIXES:
        return f"{data} is read as paragraphs of text"
    return None


def recipe_of(config: TrainConfig):
    """The run's `Recipe`: the named preset with the config's overrides in front of its own."""
    from lowbit.recipes import get_recipe, parse_override

    recipe = get_recipe(config.recipe)
    if config.overrides:
        recipe = recipe.with_overrides(*(parse_override(t, recipe) for t in config.overrides))
    return with_loss_scaling(recipe, config.loss_scale, config.loss_scale_growth_interval)


def with_loss_scaling(recipe, scale: float | None, growth_interval: int | None):
    """``recipe`` with its loss scaling's start (or static value) and growth interval replaced."""
    from lowbit.recipes import LossScaling

    if scale is None and growth_interval is None:
        return recipe
    if recipe.loss_scaling is LossScaling.NONE:
        raise UsageError(
            f"recipe {recipe.name} has no loss scaling (only the fp16 recipes need it, e.g. "
            "fp16-mixed, fp16-low); fix: drop --loss-scale/--loss-scale-growth-interval"
        )
    if growth_interval is not None and recipe.loss_scaling is not LossScaling.DYNAMIC:
        raise UsageError(
            f"recipe {recipe.name} scales the loss statically, so it never grows; fix: drop "
            "--loss-scale-growth-interval"
        )
    changes = {}
    if scale is not None:
        changes["initial_loss_scale"] = scale
    if growth_interval is not None:
        changes["loss_scale_growth_interval"] = growth_interval
    return dataclasses.replace(recipe, **changes)


def lr_at(config: TrainConfig, step: int, total_steps: int) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at the end.

    ``step`` counts optimizer steps from 0 (the lr used by the first update).
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def warn_long_warmup(config: TrainConfig, steps: int) -> None:
    """Warn of a warmup that lasts the whole new run of ``steps`` steps (``--warmup-steps 100
    --steps 10``, or ``--epochs`` of fewer steps): the learning rate never reaches lr nor decays,
    and the run trained on at a fraction of it without a word, its results read as those of its
    lr. A warning, not a refusal: a short smoke test of a real run's config file (``--steps 5``)
    is such a run on purpose. The task's default warmup is for its default length: a short run
    that keeps it is not warned of. ``config`` is resolved; `Trainer.fit` calls this once for a
    new run (every entry point trains through it; `lowbit compare` for its first run only)."""
    warmup = config.warmup_steps
    if warmup < steps or warmup == TASK_DEFAULTS[config.task]["warmup_steps"]:
        return
    length_flag = "--steps" if config.steps is not None else "--epochs"
    warn(
        f"warmup_steps {warmup} is not below the run's {steps} steps: the learning rate only "
        f"ramps up, to {lr_at(config, steps - 1, steps):.3g} of lr {config.lr:.3g}, and "
        f"never decays; fix: --warmup-steps below {steps}, or more {length_flag}"
    )


def write(config: TrainConfig, folder) -> Path:
    """Write ``config.yaml`` (the resolved settings) into ``folder``; returns its path."""
    import yaml

    return write_atomically(
        Path(folder) / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False)
    )


def write_atomically(path: Path, text: str) -> Path:
    """``path`` holds ``text`` whole, or what it held before: a kill mid-write (Ctrl-C as a resumed
    run starts) leaves no torn config.yaml or run.json for the next --resume to misread, only a
    temporary file (`is_write_leftover`)."""
    return replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def replace_atomically(path: Path, write) -> Path:
    """`write_atomically` for any writer: ``write(tmp)`` fills a temporary file beside ``path``,
    renamed over it once whole; on any failure the temporary file goes and ``path`` is as it
    was."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


RUN_INFO = "run.json"  # what the trainer records about a run beside its settings


def read_run_info(folder) -> dict:
    """A run's run.json; empty where there is none (a run from before it was written) or it is
    unreadable: its data path and fingerprint are then unknown."""
    path = Path(folder) / RUN_INFO
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def with_recorded_data(folder, config: TrainConfig) -> TrainConfig:
    """``config`` whose relative --data path and --model folder are replaced by the absolute ones
    the run in ``folder`` recorded (run.json's ``data_path`` and ``model_path``): a relative path
    names a file from the folder the run was started in, so reading it from another folder would
    read other data or another model, or none."""
    info = read_run_info(folder)
    for name, recorded in (("data", info.get("data_path")), ("model", info.get("model_path"))):
        value = getattr(config, name)
        if recorded and value not in (None, "stdlib") and not Path(value).is_absolute():
            config = dataclasses.replace(config, **{name: recorded})
    return config


def is_write_leftover(file_name: str, name: str) -> bool:
    """``file_name`` is what `write_atomically` leaves of a file ``name`` when killed mid-write."""
    return re.fullmatch(rf"\.{re.escape(name)}\.\d+\.tmp", file_name) is not None


def is_run_folder(path) -> bool:
    """``path`` is a folder `lowbit train` (or quantize/prune) wrote: a config.yaml and no
    config.json (a Hugging Face folder, or a `lowbit export`, holds one)."""
    path = Path(path)
    return (path / "config.yaml").is_file() and not (path / "config.json").exists()


def is_run_config(path) -> bool:
    """``path`` is the config.yaml of a run folder (`is_run_folder`) that the run's `RUN_INFO` or
    a quantized or pruned folder's manifest is beside: settings a run recorded, its derived ones
    among them, not a file the user wrote. The name alone took a user's own config.yaml for a
    run's, past the refusal of a setting without a value and `_check_data_beside`."""
    path = Path(path)
    if path.name != "config.yaml" or not is_run_folder(path.parent):
        return False
    if (path.parent / RUN_INFO).is_file():
        return True
    from lowbit.infer.io import is_inference_dir  # here: lowbit.infer imports this module

    return is_inference_dir(path.parent)


EXPORT_INFO = "lowbit_export.json"  # written by `lowbit export` beside the Hugging Face files


def exported_from(folder) -> str | None:
    """The run or quantized folder that the `lowbit export` in ``folder`` was made from, as its
    `EXPORT_INFO` names it; None where there is none, or it is unreadable."""
    try:
        source = json.loads((Path(folder) / EXPORT_INFO).read_text(encoding="utf-8"))["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return source if isinstance(source, str) else None


def read(folder) -> TrainConfig:
    """The config a run folder recorded."""
    path = Path(folder) / "config.yaml"
    if not path.is_file():
        if (Path(folder) / "config.json").is_file():  # `lowbit export`'s output, a checkpoint
            source = exported_from(folder)
            what = f"lowbit export of {source}" if source else "Hugging Face model folder"
            use = shlex.quote(source) if source else "the run it came from"
            raise UsageError(
                f"{folder}: a {what} (config.json), not a lowbit run folder; fix: give {use}, "
                f"or train from it with --model {shlex.quote(str(folder))}"
            )
        if not Path(folder).exists():
            raise UsageError(
                f"{folder}: no such run folder (no config.yaml); fix: give the --out folder of a run"
            )
        raise UsageError(f"{folder}: no config.yaml, not a lowbit run folder; fix: check the path")
    settings, _ = _file_settings(path)
    if not settings:  # `write` records every setting: an emptied file, read as the defaults
        raise UsageError(
            f"{path}: empty, where a run records all its settings (model, recipe, data, ...); "
            "fix: restore the run's config.yaml from a copy of the run"
        )
    unknown = _unknown_setting(settings)
    if unknown:
        raise _unknown_run_setting(folder, path, unknown)
    return build_config(settings)


def _unknown_run_setting(folder, path: Path, name: str) -> UsageError:
    """The error for a run's config.yaml holding a setting this lowbit does not have: the run was
    written by a newer lowbit (its run.json says which), or the file was edited. A run folder is
    not the user's file to correct, so the fix is the lowbit that wrote it, not the list of
    settings a typo in a --config file is shown."""
    import lowbit

    ours = lowbit.__version__
    theirs = read_run_info(folder).get("lowbit")
    if theirs and theirs != ours:
        return UsageError(
            f"{path}: setting {name!r} is unknown to this lowbit {ours}; the run was written by "
            f"lowbit {theirs}; fix: use lowbit {theirs}, which knows it"
        )
    return UsageError(
        f"{path}: setting {name!r} is unknown to this lowbit {ours} (a newer lowbit wrote the "
        "run, or the file was edited); fix: use the lowbit that wrote the run, or remove the line "
        "if it was added by hand"
    )
