"""A Ctrl-C as the `lowbit` command starts; transformers' load report and bar of a fine-tuning."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.once import folder_once_per_session

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
INTERRUPTED = "lowbit: interrupted\n"

# Imported at start-up by every Python of the subprocess (PYTHONPATH): the first import of the
# module MODULE raises SIGINT in the process, as a Ctrl-C during it would. torch is imported first
# by lowbit's own import, lowbit.commands.formats as the command line is built.
INTERRUPT_IMPORT = """
import os, signal, sys

class InterruptImport:
    def find_spec(self, name, path=None, target=None):
        if name == "MODULE":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, InterruptImport())
"""


# The same, as Python runs its exit handlers (this one the last, registered first).
INTERRUPT_AT_EXIT = """
import atexit, os, signal

def interrupt():
    os.kill(os.getpid(), signal.SIGINT)
    sum(range(1000))  # Python code, where Python's own handler raises KeyboardInterrupt

atexit.register(interrupt)
"""


def _interrupted(tmp_path, command, site: str):
    (tmp_path / "sitecustomize.py").write_text(site)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("module", ["torch", "lowbit.commands.formats"])
@pytest.mark.parametrize(
    "command",
    [[str(BIN / "lowbit"), "recipes"], [sys.executable, "-m", "lowbit", "recipes"]],
    ids=["console-script", "python-m"],
)
def test_ctrl_c_while_the_command_starts_is_one_line(tmp_path, command, module):
    done = _interrupted(tmp_path, command, INTERRUPT_IMPORT.replace("MODULE", module))
    assert (done.returncode, done.stderr, done.stdout) == (130, INTERRUPTED, "")


def test_ctrl_c_while_a_program_imports_lowbit_is_its_keyboard_interrupt(tmp_path):
    program = "try:\n import lowbit\nexcept KeyboardInterrupt:\n print('caught')"
    site = INTERRUPT_IMPORT.replace("MODULE", "torch")
    done = _interrupted(tmp_path, [sys.executable, "-c", program], site)
    assert (done.returncode, done.stdout, done.stderr) == (0, "caught\n", "")


def test_ctrl_c_as_the_finished_command_exits_prints_no_traceback(tmp_path):
    done = _interrupted(tmp_path, [str(BIN / "lowbit"), "recipes"], INTERRUPT_AT_EXIT)
    assert (done.returncode, done.stderr) == (-signal.SIGINT, "")
    assert "fp8" in done.stdout  # the command ran to its end first


# The same Ctrl-C landing in a weakref callback as lowbit.commands.formats is imported: code that
# cannot raise, where Python printed "Exception ignored in: ... KeyboardInterrupt" and the command
# went on (an import lock's callback, in a real Ctrl-C at start-up, session 36's clean-clone run).
INTERRUPT_IN_CALLBACK = """
import os, signal, sys, weakref

class Target:
    pass

def interrupted(_):
    os.kill(os.getpid(), signal.SIGINT)
    sum(range(1000))  # Python code, where Python's own handler raises KeyboardInterrupt

class InterruptInCallback:
    def find_spec(self, name, path=None, target=None):
        if name == "lowbit.commands.formats":
            sys.meta_path.remove(self)
            target = Target()
            self.ref = weakref.ref(target, interrupted)
            del target
        return None

sys.meta_path.insert(0, InterruptInCallback())
"""


def test_ctrl_c_in_a_callback_at_start_up_stops_the_command_in_one_line(tmp_path):
    done = _interrupted(tmp_path, [str(BIN / "lowbit"), "recipes"], INTERRUPT_IN_CALLBACK)
    assert (done.returncode, done.stderr, done.stdout) == (130, INTERRUPTED, "")


# Imported at start-up by the subprocess's Python (PYTHONPATH): "starting" on stdout as lowbit's
# import begins, where the command's start-up does. A Ctrl-C before it lands in Python's own
# start-up (its site module: "Fatal Python error: init_import_site" and a traceback, exit 1), which
# no program answers; counted from the process's start, the 0.3 s delay below landed there on a
# busy machine (4 runs in 12, with eight busy loops on two cores).
SAY_STARTING = """
import sys

class SayStarting:
    def find_spec(self, name, path=None, target=None):
        if name == "lowbit":
            sys.meta_path.remove(self)
            print("starting", flush=True)
        return None

sys.meta_path.insert(0, SayStarting())
"""


@pytest.mark.parametrize("delay", [0.3, 0.7, 1.1])
def test_a_real_ctrl_c_at_start_up_never_prints_a_traceback(tmp_path, delay):
    (tmp_path / "sitecustomize.py").write_text(SAY_STARTING)
    process = subprocess.Popen(
        [str(BIN / "lowbit"), "recipes"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        cwd=ROOT,
    )
    assert process.stdout.readline() == "starting\n"  # the delay counts from lowbit's start-up
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    outcomes = {
        (130, INTERRUPTED),  # lowbit was starting or running
        (-signal.SIGINT, ""),  # before Python's own handler, or as it shut down
        (0, ""),  # the command had finished
    }
    assert (process.returncode, err) in outcomes, err
    assert "Traceback" not in err


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "def", "return", "(", ")", ":", "x"]


def _encoder_folder(folder: Path, drop: str | None = None, extra: str | None = None) -> Path:
    """A tiny BERT encoder as save_pretrained writes it (its pooler included), less the weight
    ``drop``, with a weight ``extra`` of no layer the config has."""
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertModel, BertTokenizerFast

    BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(folder)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32)  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    if drop is not None or extra is not None:
        weights = load_file(folder / "model.safetensors")
        weights.pop(drop, None)
        if extra is not None:
            weights[extra] = torch.zeros(16)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


# One process fine-tunes each folder in turn: transformers' import (~5 s of CPU, torchao's with it)
# is most of a fine-tuning's cost. The intact encoder goes first, so that its run is the process's
# first, as a `lowbit train` command's is: transformers' progress switch and log handler as a new
# process has them (run by a subprocess: in pytest, transformers' log handler may hold a stream
# other than the one a capture fixture reads). HF_HUB_DISABLE_PROGRESS_BARS=0 pins
# huggingface_hub's progress switch on, which a quiet run must not take for transformers' own.
FINE_TUNE_EACH = """
import json, sys
from lowbit.cli import main

for i, argv in enumerate(json.loads(sys.argv[1])):
    print("=== run", i, file=sys.stderr, flush=True)
    code = main(argv)
    if code != 0:
        sys.exit(f"run {i} exited {code}")
"""

FOLDERS = {
    "intact": {},
    "missing": {"drop": "encoder.layer.0.output.dense.bias"},
    "extra": {"extra": "encoder.layer.1.output.dense.bias"},
}


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory) -> dict[str, str]:
    """The stderr of `lowbit train` fine-tuning each of FOLDERS for one step, by its name, on a
    few CoNLL sentences of the encoder's words: the built-in syntax-tag task parses and encodes
    a whole source tree first, most of the run's time and none of what these tests read. Made
    once per session."""
    return folder_once_per_session(tmp_path_factory, "cli-polish-s34", _fine_tune)


def _fine_tune(base) -> dict[str, str]:
    data = base / "conll"
    data.mkdir()
    sentence = ["def O", "x B-VAR", "( O", "x B-VAR", ") O", ": O", "return O", "x B-VAR", ""]
    for split in ("train", "dev", "test"):
        (data / f"{split}.txt").write_text("\n".join(sentence * 4))
    runs = []
    for name, change in FOLDERS.items():
        folder = _encoder_folder(base / name, **change)
        runs.append([
            "train", "--task", "token-classification", "--model", str(folder), "--data",
            str(data), "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--quiet",
            "--out", str(base / f"run-{name}"),
        ])  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "0"}
    done = subprocess.run(
        [sys.executable, "-c", FINE_TUNE_EACH, json.dumps(runs)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    said = re.split(r"^=== run \d+\n", done.stderr, flags=re.MULTILINE)[1:]
    assert len(said) == len(FOLDERS), done.stderr
    return dict(zip(FOLDERS, said, strict=True))


def test_fine_tuning_an_encoder_prints_no_load_report(fine_tuned):
    err = fine_tuned["intact"]
    assert "LOAD REPORT" not in err
    assert "pooler" not in err and "classifier" not in err  # expected of every fine-tuning


def test_a_quiet_run_shows_no_loading_bar_with_the_hubs_bars_pinned_on(fine_tuned):
    """Session 37: a quiet run turns transformers' progress bars off without importing
    transformers where it can; where ``HF_HUB_DISABLE_PROGRESS_BARS`` is set false (which pins
    huggingface_hub's switch, not transformers'), transformers' own switch is turned as before, so
    a quiet fine-tuning run prints no "Loading weights" bar (the review of that change found one).
    """
    err = fine_tuned["intact"]
    assert "Loading weights" not in err, err


def test_an_encoder_weight_missing_from_the_folder_is_named(fine_tuned):
    err = fine_tuned["missing"]
    assert "LOAD REPORT" not in err
    warnings = [line for line in err.splitlines() if "drawn afresh" in line]
    assert len(warnings) == 1
    assert "bert.encoder.layer.0.output.dense.bias" in warnings[0]
    assert "pooler" not in warnings[0] and "classifier" not in warnings[0]


def test_a_folder_weight_the_encoder_has_no_place_for_is_named(fine_tuned):
    err = fine_tuned["extra"]
    warnings = [line for line in err.splitlines() if "did not use" in line]
    assert len(warnings) == 1 and "encoder.layer.1.output.dense.bias" in warnings[0]
    assert "pooler" not in warnings[0] and "drawn afresh" not in warnings[0]
