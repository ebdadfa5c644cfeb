"""`lowbit generate RUN_DIR --prompt ...` (or `--prompt-file PATH`): sample text from a trained
causal LM."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lowbit.data.corpus import STANDARD_INPUT, decode_text
from lowbit.errors import UsageError, check_given

NAME = "generate"
HELP = "Sample text from a causal-LM run's checkpoint."
DEFAULT_PROMPT = "def "


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a run folder (lowbit train --out), or a folder lowbit quantize/prune wrote",
    )
    # no argparse default: run() tells a --prompt given alongside --prompt-file from none given
    parser.add_argument("--prompt", help=f"text to continue (default {DEFAULT_PROMPT!r})")
    parser.add_argument(
        "--prompt-file",
        metavar="PATH",
        help="read the text to continue from a UTF-8 file, exactly as it holds it (a final "
        "newline included); '-' reads standard input; instead of --prompt",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=200, help="tokens to sample (default 200)"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        help="softmax temperature; 0 is greedy (default 0.8)",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=40,
        help="sample among the k likeliest; 0 is among all (default 40)",
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        metavar="P",
        help="nucleus sampling: among the fewest likeliest tokens whose probabilities add up to P "
        "or more, after --temperature and --top-k; P in (0, 1], 1 is among all (default 1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument(
        "--checkpoint",
        metavar="CKPT",
        help="a checkpoint: its path, its file name in the run's checkpoints/, or its step number "
        "(default: the latest)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="device (default: the run's; cpu for a quantized or pruned folder)",
    )


def _read_prompt_file(path: str) -> str:
    """The text of ``path`` (standard input for ``-``), decoded strictly as UTF-8: a Latin-1
    byte decoded leniently would reach the tokenizer as U+FFFD and change the sample unseen.
    A byte-order mark (Windows Notepad's) is no part of the text and is dropped. A file and
    standard input get a data file's checks, errors and fixes (`decode_text`; for standard input
    the command to pipe it through): UTF-16 text without a byte-order mark was a prompt with a
    NUL between its letters, and a cp1252 file was told "iconv -f latin1"."""
    name = "standard input" if path == "-" else path
    try:
        if path == "-":
            if sys.stdin is None:  # started with standard input closed (`<&-`, some daemons)
                raise UsageError(
                    "--prompt-file -: standard input is closed; fix: give the prompt's file "
                    "path, or pass the text as --prompt"
                )
            data = sys.stdin.buffer.read()
        else:
            with open(os.path.expanduser(path), "rb") as file:  # a quoted ~ too
                data = file.read()
    except FileNotFoundError:
        raise UsageError(
            f"--prompt-file {path}: no such file; fix: check the path, or pass the text as --prompt"
        ) from None
    except IsADirectoryError:
        raise UsageError(
            f"--prompt-file {path}: a folder, not a file; fix: give a text file"
        ) from None
    except OSError as error:  # no permission, a file as a folder in the path, an I/O error
        reason = error.strerror or type(error).__name__
        raise UsageError(
            f"--prompt-file {name}: cannot be read ({reason}); fix: check the path and its "
            "permissions, or pass the text as --prompt"
        ) from None
    # the prompt file is all the prompt: "remove it" is no fix
    source = STANDARD_INPUT if path == "-" else Path(os.path.expanduser(path))
    try:
        return decode_text(source, data, or_else=None)
    except UsageError as error:
        raise UsageError(f"--prompt-file {error}") from None


def _prompt(args) -> str:
    """The prompt: --prompt's text, --prompt-file's, or the default when neither is given."""
    if args.prompt is not None and args.prompt_file is not None:
        raise UsageError("--prompt and --prompt-file both give the prompt; fix: give one of them")
    if args.prompt_file is not None:
        check_given(args.prompt_file, "--prompt-file", "give a file's path, or - for stdin")
        return _read_prompt_file(args.prompt_file)
    prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
    _check_utf8(prompt)
    return prompt


def _check_utf8(prompt: str) -> None:
    """Refuse a prompt holding bytes that are not UTF-8 (a Latin-1 file through ``$(cat ...)``):
    Python's arguments carry each as a lone surrogate (U+DC80-U+DCFF), which no tokenizer
    encodes."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:
        byte = ord(prompt[error.start]) - 0xDC00
        raise UsageError(
            f"--prompt is not UTF-8 text (byte 0x{byte:02x} at character {error.start}); fix: "
            "pass it in UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def run(args) -> int:
    from lowbit.infer.steps import refuse_other_tasks
    from lowbit.train import load_run, sample_text
    from lowbit.train.generate import check_sampling, print_encodable, visible

    check_given(args.run_dir, "RUN_DIR")
    check_given(args.checkpoint, "--checkpoint")
    if sys.stdout is None:  # started with standard output closed (`>&-`): the sample goes nowhere
        raise UsageError("standard output is closed; fix: write it to a file (> sample.txt)")
    # before the model loads (seconds for a large one)
    check_sampling(
        args.max_new_tokens, args.temperature, args.top_k, args.seed, args.top_p, flags=True
    )
    prompt = _prompt(args)
    # a quoted ~ (a script's argument) is the home folder, as `lowbit eval` reads it
    checkpoint = args.checkpoint and os.path.expanduser(args.checkpoint)
    run_dir = os.path.expanduser(args.run_dir)
    refuse_other_tasks(run_dir, "generate from a causal-lm run")  # before it loads
    loaded = load_run(run_dir, checkpoint, args.device)
    note = getattr(loaded.model, "lowbit_inference_note", None)
    if note:  # a quantized folder: say which layers run on real kernels and which are emulated
        print(f"(quantized model: {note})", file=sys.stderr)
    text = sample_text(
        loaded.model,
        loaded.task.tokenizer,
        loaded.precision,
        prompt,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.seed,
        args.top_p,
    )
    if sys.stdout.isatty():  # as the training summary's sample: an early byte-level model
        # samples any byte, and a raw ESC sequence would drive the terminal; a pipe or a file
        # gets the text as sampled
        text = "\n".join(visible(line) for line in text.split("\n"))
    print_encodable(text)
    return 0
