"""Session 38's walk through the benchmark scripts as a user on another machine would run them: a
run trained on a small --data corpus, a quantized folder given as the run, an unknown recipe or
size after a known one, a preset that transforms no GEMM, and stats_overhead.py's section written
by the shared `benchmarks_md.write_section`."""

import importlib
import importlib.util
import re
from pathlib import Path

import pytest
import torch

from lowbit.cli import main as lowbit
from lowbit.train import TrainConfig, train
from lowbit.train import trainer as trainer_module

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _train(folder, **settings):
    """A causal-LM run of one step on a corpus of about 6 kB: its validation split holds a few
    hundred tokens, fewer than the 16 x 256 that inference.py's speed pass took."""
    lines = [f"paragraph {i}: the quick brown fox jumps over the lazy dog" for i in range(100)]
    (folder / "small.txt").write_text("\n\n".join(lines) + "\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    patch = pytest.MonkeyPatch()
    patch.setattr(trainer_module, "SAMPLE_TOKENS", 4)
    try:
        config = TrainConfig(
            data=str(folder / "small.txt"),
            steps=1,
            batch_size=2,
            seq_len=32,
            eval_interval=1,
            eval_batches=1,
            out=str(folder / "run"),
            **settings,
        )
        train(config)
    finally:
        patch.undo()
        torch.set_num_threads(threads)
    return folder / "run"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("small"), model="nano")


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    """A 2-block GPT-2 of 64 positions, fewer than the 256 tokens a sequence the speed pass took."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("gpt2")
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=257, n_positions=64)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder / "gpt2")
    return _train(folder, model=str(folder / "gpt2"))


@pytest.fixture
def inference(monkeypatch):
    """benchmarks/inference.py as a module, its one-layer timings on a small shape (the 4096-row
    layers take seconds a round and are no part of what these tests check)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("inference_s38", BENCHMARKS / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "LAYER_SHAPES", [(8, 16, 16)])
    monkeypatch.setattr("sys.argv", [str(BENCHMARKS / "inference.py")])
    return module


@pytest.mark.parametrize(("run", "positions"), [("small_run", None), ("gpt2_run", 64)])
def test_inference_times_what_the_split_and_the_model_hold(
    run, positions, inference, request, capsys
):
    """A run on a small --data corpus: `RuntimeError: shape '[16, 256]' is invalid for input of
    size 807` after the whole quality pass, and a model of 64 positions an IndexError; now the
    speed pass times the sequences the split and the model hold, and says so."""
    run = request.getfixturevalue(run)
    argv = ["--run", str(run), "--quick", "--rounds", "1", "--max-batches", "1"]
    assert inference.main(argv) == 0
    out = capsys.readouterr().out
    takes = f" and the model takes {positions} positions" if positions else ""
    note = re.search(
        rf"^note: the validation split holds ([\d,]+) tokens{takes}: batched evaluation is "
        r"timed on (\d+) x (\d+) tokens a forward, not 16 x 256$",
        out,
        re.M,
    )
    assert note, out[-3000:]
    tokens, rows, length = (int(group.replace(",", "")) for group in note.groups())
    assert tokens < 16 * 256 and length == min(256, tokens, positions or 256)
    assert rows == min(16, tokens // length)
    assert f"| eval {rows}x{length} | fp32 | " in out
    assert f"| eval {rows}x{length} | int8 W8A8 (oneDNN qlinear) | " in out


def test_inference_refuses_a_quantized_folder_before_any_work(
    small_run, inference, tmp_path, capsys
):
    """A quantized folder as --run: its int8 model was measured as the "fp32 (reference)" row,
    then quantizing it again failed ("no linear layer to quantize; fix: quantize a transformer
    run"), a fix that did not apply."""
    lowbit(["quantize", str(small_run), "--to", "int8", "--out", str(tmp_path / "q8")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        inference.main(["--run", str(tmp_path / "q8"), "--quick", "--no-speed"])
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines()[-1] == (
        f"inference.py: error: {tmp_path / 'q8'} is a quantized/pruned folder, not a training "
        f"run; fix: give the run it was made from, --run {small_run}"
    )


def test_inference_refuses_a_run_of_another_task_naming_the_fix(inference, tmp_path, capsys):
    """An image-classification run: "is a image-classification run; give a causal-lm run", no
    fix named as the other refusals name theirs."""
    torch.set_num_threads(1)
    settings = {"steps": 1, "batch_size": 8, "eval_batches": 1, "eval_interval": 1}
    train(TrainConfig(task="image-classification", out=str(tmp_path / "digits"), **settings))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        inference.main(["--run", str(tmp_path / "digits"), "--quick"])
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines()[-1] == (
        f"inference.py: error: {tmp_path / 'digits'} is an image-classification run, not a causal "
        "LM's; fix: give a causal-lm run folder (lowbit train --out)"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--recipes", "fp32,nosuch"], "unknown recipe 'nosuch' in --recipes; fix: use names"),
        (["--recipes", "fp32,,bf16-mixed"], "--recipes entry 2 is empty"),
        (["--size", "nosuch"], "unknown model size 'nosuch'; valid model sizes: nano, "),
    ],
)
def test_activation_ratios_refuses_an_unknown_name_before_measuring(
    argv, message, tmp_path, as_script
):
    """An unknown recipe after a known one: a traceback once the known one was measured."""
    done = as_script("activation_ratios", *argv, "--batch", "1", "--seq", "8", cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == "", done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("activation_ratios.py: error: ") and message in line


@pytest.mark.parametrize(
    ("recipes", "message"),
    [
        ("", "no recipes given; fix: --recipes fp32,bf16-mixed,..."),
        ("fp32,,bf16-mixed", "--recipes entry 2 is empty ('fp32,,bf16-mixed'); fix: name a"),
    ],
)
def test_recipe_speed_names_an_empty_recipe_list(recipes, message, tmp_path, as_script):
    """`--recipes ""` was "unknown recipe(s) ; see `lowbit recipes`", naming nothing."""
    done = as_script("recipe_speed", "--recipes", recipes, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == "", done.stderr[-2000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"recipe_speed.py: error: {message}")


def test_hadamard_sqnr_refuses_a_preset_without_low_precision_gemms(tmp_path, as_script):
    """`--recipes fp32` (no quantized GEMM at all): `AttributeError: 'NoneType' object has no
    attribute 'grad_input'`."""
    done = as_script("hadamard_sqnr", "--recipes", "fp32", "--seeds", "1", cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == "", done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "hadamard_sqnr.py: error: --recipes: fp32 transforms no GEMM (mxfp4 and nvfp4 do)"
    )


STATS = ["--interval", "1", "--intervals", "1", "--batch-size", "1", "--seq-len", "8", "--write"]
STATS_HEADING = "## Statistics overhead (benchmarks/stats_overhead.py)"


def test_stats_overhead_writes_its_section_as_the_other_scripts(tmp_path, monkeypatch, as_script):
    """stats_overhead.py wrote BENCHMARKS.md with a copy of `write_section` of its own, next to
    the checkout's page whatever page the others were pointed at; its section replaced whole,
    the sections around it kept."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    page = tmp_path / "BENCHMARKS.md"
    page.write_text(
        f"# Benchmarks\n\n## Before\n\nkept\n\n{STATS_HEADING}\n\nold figures\n\n## After\n\nkept\n"
    )
    monkeypatch.setattr(importlib.import_module("benchmarks_md"), "BENCHMARKS_MD", page)
    done = as_script("stats_overhead", *STATS, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    text = page.read_text()
    assert "old figures" not in text and text.count(STATS_HEADING) == 1
    before, section = text.split(f"{STATS_HEADING}\n\n")
    section, after = section.split("\n\n## After\n\n")
    assert before == "# Benchmarks\n\n## Before\n\nkept\n\n" and after == "kept\n"
    command = "python benchmarks/stats_overhead.py " + " ".join(STATS)
    assert section.startswith(f"`{command}`: causal-lm tiny, recipe fp8-tensorwise, batch 1 x 8")
    assert section.endswith("Off, no observer is attached and the layers run no extra code.")
    assert section in done.stdout  # what it printed is what it wrote


def test_a_ctrl_c_midway_is_one_line_and_leaves_the_page(tmp_path, monkeypatch, as_script):
    """Ctrl-C during the timed steps: a KeyboardInterrupt traceback; now the one line `lowbit`
    says, status 130, the page as it was (sections are written whole, at the end)."""
    from lowbit.train.trainer import Trainer

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    page = tmp_path / "BENCHMARKS.md"
    recorded = f"# Benchmarks\n\n{STATS_HEADING}\n\nold figures\n"
    page.write_text(recorded)
    monkeypatch.setattr(importlib.import_module("benchmarks_md"), "BENCHMARKS_MD", page)
    step, calls = Trainer.step, []

    def interrupted_step(self, *args, **kwargs):
        calls.append(self)
        if len(calls) > 4:  # after the warm-up, among the timed steps
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "step", interrupted_step)
    try:
        done = as_script("stats_overhead", *STATS, cwd=tmp_path)
    except KeyboardInterrupt:  # out of the script: it would stop this whole test session
        pytest.fail("the Ctrl-C came out of the script as a traceback")
    assert (done.returncode, done.stdout, done.stderr.strip().splitlines()[-1]) == (
        130,
        "",
        "stats_overhead.py: interrupted",
    )
    assert "Traceback" not in done.stderr and page.read_text() == recorded


RECORDED = "# Benchmarks\n\n## Parity (benchmarks/parity.py)\n\nthe recorded study\n"
DOC = "# Parity\n\n<!-- parity results: begin -->\nrecorded\n<!-- parity results: end -->\n"
PARITY = ["--tasks", "image-classification", "--recipes", "fp32", "--seeds", "1"]
PARITY += ["--img-steps", "1", "--jobs", "1", "--quiet"]


def test_a_ctrl_c_of_the_parity_study_is_one_line_and_resumes(
    parity, pages, tmp_path, monkeypatch, capsys
):
    """Ctrl-C as a run trains: a KeyboardInterrupt traceback; now one line naming the fix (the
    same command again), both pages as they were, and that command finishes the study."""
    from lowbit.train.trainer import Trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "fit", interrupted)
        try:
            code = parity.main([*PARITY, "--out", str(out)])
        except KeyboardInterrupt:  # out of the script: it would stop this whole test session
            pytest.fail("the Ctrl-C came out of parity.py as a traceback")
    assert code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "parity: interrupted; BENCHMARKS.md and docs/parity.md left as they were; run the same "
        f"command again to resume (the finished runs in {out} are reused)"
    )
    assert (pages / "BENCHMARKS.md").read_text() == RECORDED
    assert (pages / "docs" / "parity.md").read_text() == DOC
    assert parity.main([*PARITY, "--out", str(out)]) == 0
    assert "### image-classification: model tiny, 1 steps" in (pages / "BENCHMARKS.md").read_text()


def test_the_eval_note_names_the_model_alone_where_only_its_positions_limit(inference, capsys):
    """A long split and a model of 64 positions: the note began "the validation split holds
    2,048 tokens", which limited nothing, before the positions that did."""
    from types import SimpleNamespace

    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_embd=8, n_head=1, vocab_size=16, n_positions=64)
    tokens = torch.arange(2048) % 16  # 32 sequences of 64
    task = SimpleNamespace(tokens=lambda split: tokens)
    source = SimpleNamespace(task=task, model=GPT2LMHeadModel(config))
    assert inference.eval_batch(source).shape == (16, 64)
    assert capsys.readouterr().out == (
        "note: the model takes 64 positions: batched evaluation is timed on 16 x 64 tokens a "
        "forward, not 16 x 256\n"
    )
