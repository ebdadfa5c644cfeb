"""lowbit on a CUDA GPU against the CPU: every preset trains alike, a run resumes, quantized models
infer alike, NCCL groups of one, compare's GPU memory, the doctor, low-precision optimizer states.

Runs only where CUDA is available (skipped on the CPU machines this project is built on); run it on a
GPU with ``pytest tests/gpu``. The CPU run is the reference: the same settings, seed and data on
both devices, so the two differ only by what each device rounds differently (the order of GEMM
accumulation; fp16 emulated at the GEMM boundaries on the CPU and autocast's fp16 kernels on the
GPU; native fp8 GEMMs on GPUs of capability >= 8.9, `test_native_fp8.py`). A wrong scale, a lost
state or a tensor left on the wrong device shows up as a failure or as losses far apart.
"""

import json
import math

import pytest
import torch

import lowbit
from lowbit.formats.error import sqnr
from lowbit.infer import QuantRecipe, load_source, quantize_model
from lowbit.train import TrainConfig, evaluate_run, train
from lowbit.train import checkpoint as ckpt
from lowbit.train import trainer as trainer_module

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SETTINGS = {
    "causal-lm": {"seq_len": 32, "batch_size": 8, "eval_batches": 2, "lr": 3e-3},
    "image-classification": {"batch_size": 32, "lr": 1e-2},
}
STEPS = 12
GPU = "cuda"


@pytest.fixture(autouse=True)
def short_samples(monkeypatch):
    monkeypatch.setattr(trainer_module, "SAMPLE_TOKENS", 8)


def config(out, task, device, **settings):
    settings = {"steps": STEPS, "warmup_steps": 2, "eval_interval": STEPS, **settings}
    return TrainConfig(task=task, device=device, out=str(out), **SETTINGS[task], **settings)


@pytest.mark.parametrize("task", list(SETTINGS))
@pytest.mark.parametrize("recipe", lowbit.recipe_names())
def test_every_preset_trains_on_cuda_as_on_the_cpu(tmp_path, task, recipe):
    cpu = train(config(tmp_path / "cpu", task, "cpu", recipe=recipe), quiet=True)
    gpu = train(config(tmp_path / "gpu", task, GPU, recipe=recipe), quiet=True)
    print(
        f"{task} {recipe}: start {cpu.start_metrics['loss']:.4f} (cpu) "
        f"{gpu.start_metrics['loss']:.4f} (cuda), after {STEPS} steps "
        f"{cpu.final_metrics['loss']:.4f} (cpu) {gpu.final_metrics['loss']:.4f} (cuda)"
    )
    assert gpu.status == "completed" and gpu.steps == STEPS
    assert math.isfinite(gpu.train_loss)
    assert gpu.final_metrics["loss"] < 0.9 * gpu.start_metrics["loss"]  # it learns
    # on an H200 the two agreed within 0.03% at the start and 0.23% after 12 steps (docs/gpu.md)
    assert gpu.start_metrics["loss"] == pytest.approx(cpu.start_metrics["loss"], rel=0.002)
    assert gpu.final_metrics["loss"] == pytest.approx(cpu.final_metrics["loss"], rel=0.01)
    # the GPU checkpoint rebuilds the same numerics there
    metrics, _ = evaluate_run(tmp_path / "gpu", max_batches=SETTINGS[task].get("eval_batches"))
    assert metrics["loss"] == pytest.approx(gpu.final_metrics["loss"], rel=1e-6)


@pytest.mark.parametrize("recipe", ["fp8-tensorwise", "fp8-rowwise", "nvfp4"])
def test_gpt2_conv1d_layers_train_on_cuda_as_on_the_cpu(tmp_path, recipe):
    # GPT-2's Conv1D projections reach the GEMMs as transposed (non-contiguous) weight views.
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=64, n_head=2, vocab_size=257))
    model.save_pretrained(tmp_path / "gpt2")
    settings = {"recipe": recipe, "model": str(tmp_path / "gpt2")}
    cpu = train(config(tmp_path / "cpu", "causal-lm", "cpu", **settings), quiet=True)
    gpu = train(config(tmp_path / "gpu", "causal-lm", GPU, **settings), quiet=True)
    assert gpu.final_metrics["loss"] < 0.9 * gpu.start_metrics["loss"]
    assert gpu.final_metrics["loss"] == pytest.approx(cpu.final_metrics["loss"], rel=0.01)


@pytest.mark.parametrize("recipe", ["fp8-tensorwise", "mxfp8", "nvfp4"])
def test_mixture_of_experts_layers_train_on_cuda_as_on_the_cpu(tmp_path, recipe):
    # Mixtral's experts (3-D Parameters): one low-precision layer per expert GEMM, tokens routed
    # by counts read back from the device (lowbit.nn.experts).
    from tests.moe import mixtral

    mixtral(num_hidden_layers=3, max_position_embeddings=64).save_pretrained(tmp_path / "moe")
    settings = {"recipe": recipe, "model": str(tmp_path / "moe")}
    cpu = train(config(tmp_path / "cpu", "causal-lm", "cpu", **settings), quiet=True)
    gpu = train(config(tmp_path / "gpu", "causal-lm", GPU, **settings), quiet=True)
    assert gpu.final_metrics["loss"] < 0.9 * gpu.start_metrics["loss"]
    assert gpu.final_metrics["loss"] == pytest.approx(cpu.final_metrics["loss"], rel=0.01)


@pytest.fixture
def deterministic():
    """cuBLAS and PyTorch's CUDA kernels in their deterministic modes (tests/gpu/conftest.py sets
    the cuBLAS workspace before CUDA starts), so that two runs can be compared bit for bit."""
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("recipe", ["fp16-mixed", "bf16-pure-sr", "fp8-delayed", "mxfp4"])
def test_resume_on_cuda_is_bit_identical(tmp_path, deterministic, recipe):
    settings = {"recipe": recipe, "steps": 6, "eval_interval": 2}
    straight = train(config(tmp_path / "a", "causal-lm", GPU, **settings), quiet=True)

    def crash(trainer):
        if trainer.step_idx == 5:  # after the checkpoint of step 4
            raise RuntimeError("simulated crash")

    interrupted = config(tmp_path / "b", "causal-lm", GPU, **settings)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(interrupted, quiet=True, on_step=crash)
    resumed = train(interrupted, resume=True, quiet=True)
    assert resumed.final_metrics == straight.final_metrics
    assert resumed.train_loss == straight.train_loss
    a = ckpt.load(ckpt.latest(tmp_path / "a"))["model"]
    b = ckpt.load(ckpt.latest(tmp_path / "b"))["model"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    records = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in records if '"train"' in r] == [1, 2, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A tiny Llama trained 12 steps in fp32 on the CPU, on one thread like every test (a module
    fixture runs outside tests/conftest.py's per-test setting; pytest-xdist workers each using
    every core took 90 s for it on a 16-core machine)."""
    out = tmp_path_factory.mktemp("cuda") / "lm"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    patch = pytest.MonkeyPatch()
    patch.setattr(trainer_module, "SAMPLE_TOKENS", 4)
    try:
        train(config(out, "causal-lm", "cpu", recipe="fp32"), quiet=True)
    finally:
        patch.undo()
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize(
    ("to", "mode", "group"),
    [
        ("int8", "weights-and-activations", None),
        ("int8", "weights-only", None),
        ("int4", "weights-only", 8),
        ("fp8", "weights-and-activations", None),
        ("mxfp4", "weights-and-activations", None),
        ("nvfp4", "weights-only", None),
    ],
)
@pytest.mark.parametrize("tokens", [24, 1], ids=["prefill", "one-token"])
def test_quantized_model_runs_on_cuda_as_on_the_cpu(lm_run, to, mode, group, tokens):
    ids = torch.randint(0, 256, (2, tokens), generator=torch.Generator().manual_seed(0))
    logits = {}
    for device in ("cpu", GPU):
        source = load_source(lm_run, device=device)
        quantize_model(source.model, QuantRecipe(to, mode, group))
        with torch.no_grad():
            logits[device] = source.model(input_ids=ids.to(device), use_cache=False).logits.cpu()
    assert sqnr(logits["cpu"], logits[GPU]) > 30


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_one_process_nccl_group_trains_as_plain_training(tmp_path, strategy):
    """DDP and FSDP2 on NCCL, one GPU: the group of one follows the run without a strategy."""
    settings = {"recipe": "bf16-mixed", "steps": 6, "eval_interval": 6}
    plain = train(config(tmp_path / "plain", "causal-lm", GPU, **settings), quiet=True)
    grouped = train(
        config(tmp_path / strategy, "causal-lm", GPU, strategy=strategy, nproc=1, **settings),
        quiet=True,
    )
    assert grouped.status == "completed" and grouped.steps == 6
    assert grouped.final_metrics["loss"] == pytest.approx(plain.final_metrics["loss"], rel=0.01)


def test_compare_on_cuda_measures_the_gpus_peak_memory(tmp_path):
    from lowbit.report import compare, make_study

    base = {**SETTINGS["causal-lm"], "steps": 4, "eval_interval": 4, "warmup_steps": 1}
    study = make_study("fp32,bf16-low", {**base, "device": GPU}, seeds=1, out=tmp_path / "c")
    rows = compare(study, plots=False, log=lambda line: None).results["recipes"]
    for recipe in ("fp32", "bf16-low"):
        assert rows[recipe]["peak_memory_kind"] == "cuda max allocated"
        # at the optimizer step parameters, gradients, master weights and AdamW's two states are
        # all allocated: 4+4+0+8 bytes per parameter in fp32, 2+2+4+8 in bf16-low
        assert rows[recipe]["peak_memory_bytes"] >= 16 * rows[recipe]["num_params"]


def test_doctor_on_cuda_names_the_layer_the_outliers_break():
    from lowbit.diagnostics.cases import inject_outliers
    from lowbit.diagnostics.doctor import diagnose
    from lowbit.train.config import resolve

    broken = "model.layers.1.mlp.down_proj"
    settings = {**SETTINGS["causal-lm"], "recipe": "fp8-tensorwise", "device": GPU, "out": "unused"}
    config = resolve(TrainConfig(task="causal-lm", **settings))
    diagnosis = diagnose(config, steps=2, prepare=lambda t: inject_outliers(t.model, broken))
    assert {row.layer for row in diagnosis.rows[:2]} == {broken}
    assert diagnosis.suggestions[0] == f"{broken}=forward.x:bf16,grad_weight.x:bf16"


@pytest.mark.parametrize("state", ["bf16", "8bit", "4bit", "fp8"])
def test_low_precision_optimizer_states_train_on_cuda_as_on_the_cpu(tmp_path, state):
    settings = {"recipe": "bf16-mixed", "optimizer_state": state}
    cpu = train(config(tmp_path / "cpu", "causal-lm", "cpu", **settings), quiet=True)
    gpu = train(config(tmp_path / "gpu", "causal-lm", GPU, **settings), quiet=True)
    print(f"optimizer state {state}: {cpu.final_metrics['loss']:.4f} (cpu)", end=" ")
    print(f"{gpu.final_metrics['loss']:.4f} (cuda)")
    assert gpu.final_metrics["loss"] < 0.9 * gpu.start_metrics["loss"]
    assert gpu.final_metrics["loss"] == pytest.approx(cpu.final_metrics["loss"], rel=0.01)
