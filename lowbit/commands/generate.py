"""`lowbit generate RUN_DIR --prompt ...`: sample text from a trained causal LM."""

from __future__ import annotations

import argparse
import sys

from lowbit.errors import UsageError, check_given

NAME = "generate"
HELP = "Sample text from a causal-LM run's checkpoint."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a run folder (lowbit train --out), or a folder lowbit quantize/prune wrote",
    )
    parser.add_argument("--prompt", default="def ", help="text to continue (default 'def ')")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to sample (200)")
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
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument(
        "--checkpoint",
        metavar="CKPT",
        help="a checkpoint: its path, its file name in the run's checkpoints/, or its step number "
        "(default: the latest)",
    )
    parser.add_argument("--device", default=None, help="device (default: the run's)")


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
    from lowbit.train import load_run, sample_text
    from lowbit.train.generate import check_sampling, visible

    check_given(args.run_dir, "RUN_DIR")
    check_given(args.checkpoint, "--checkpoint")
    _check_utf8(args.prompt)
    # before the model loads (seconds for a large one)
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.seed)
    loaded = load_run(args.run_dir, args.checkpoint, args.device)
    if loaded.config.task != "causal-lm":
        task = loaded.config.task
        article = "an" if task[0] in "aeiou" else "a"  # an image-classification run
        raise UsageError(
            f"{args.run_dir} is {article} {task} run; fix: generate from a causal-lm run"
        )
    note = getattr(loaded.model, "lowbit_inference_note", None)
    if note:  # a quantized folder: say which layers run on real kernels and which are emulated
        print(f"(quantized model: {note})", file=sys.stderr)
    text = sample_text(
        loaded.model,
        loaded.task.tokenizer,
        loaded.precision,
        args.prompt,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.seed,
    )
    if sys.stdout.isatty():  # as the training summary's sample: an early byte-level model
        # samples any byte, and a raw ESC sequence would drive the terminal; a pipe or a file
        # gets the text as sampled
        text = "\n".join(visible(line) for line in text.split("\n"))
    print(text)
    return 0
