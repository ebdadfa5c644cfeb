"""`Precision` (session 37): one given no device computes on the device type of the model it
converts, and its autocast refuses a model moved off that device; a recipe that computes alike on
any device (fp32) takes and refuses no device; a model with no GEMM layer is reported as such;
16-bit parameters leave a Hugging Face rotary embedding's fp32 frequencies as they are.

This CPU-only torch cannot make a CUDA tensor: a model "on a GPU" here holds `_OnDevice` tensors,
which carry a device and a shape and nothing else (what `Precision.convert` reads of a model under
a recipe of fp32 parameters), and a loss "on a GPU" is one too."""

import contextlib
import dataclasses
import logging

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lowbit
from lowbit.errors import UsageError

pytestmark = pytest.mark.filterwarnings("ignore:CUDA is not available")  # torch.autocast("cuda")


class _OnDevice(torch.Tensor):
    """A tensor's metadata on ``device``, without values: any op on it raises."""

    @staticmethod
    def __new__(cls, shape, device):
        return torch.Tensor._make_wrapper_subclass(cls, shape, device=torch.device(device))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"{func} on a tensor without values")


def _model(*devices: str) -> nn.Sequential:
    """One linear layer per device in ``devices``, its parameters there ("cpu": real ones)."""
    model = nn.Sequential(*(nn.Linear(4, 4) for _ in devices))
    _move(model, *devices)
    return model


def _move(model: nn.Sequential, *devices: str) -> None:
    """Put the parameters of ``model``'s layers on ``devices``, one per layer ("cpu": zeros)."""
    for layer, device in zip(model, devices, strict=True):
        for name, param in list(layer._parameters.items()):
            on_cpu = device == "cpu"
            layer._parameters[name] = (
                nn.Parameter(torch.zeros(param.shape)) if on_cpu else _OnDevice(param.shape, device)
            )


@pytest.mark.parametrize(
    ("recipe", "dtype"),
    [("bf16-mixed", torch.bfloat16), ("fp16-mixed", torch.float16), ("mxfp8", torch.bfloat16)],
)
def test_a_precision_given_no_device_computes_on_the_models(recipe, dtype):
    # Precision(recipe) was the CPU's: its autocast left a GPU model's forward in fp32 (fp16-mixed:
    # no fp16 at all, its CPU emulation off the GPU), refused at the first backward, unnoticed in
    # a loop of forward passes only
    precision = lowbit.Precision(recipe)
    precision.convert(_model("cuda:0", "cuda:0"))
    assert precision.device == torch.device("cuda")
    assert precision.autocast_dtype == dtype
    autocast = precision.autocast()
    assert (autocast.device, autocast.fast_dtype) == ("cuda", dtype)
    # a model on the meta device (converted before to_empty) says nothing: the next one decides
    precision = lowbit.Precision(recipe)
    precision.convert(_model("meta"))
    assert precision.device == torch.device("cpu")
    precision.convert(_model("cuda:0"))
    assert precision.device == torch.device("cuda")


def test_the_device_taken_is_a_device_type():
    # autocast works per device type: a device_map model over two GPUs, and a student on one GPU
    # with its teacher on another, were refused (cuda:0 against cuda:1)
    precision = lowbit.Precision("bf16-mixed")
    precision.convert(_model("cuda:0", "cuda:1"))
    precision.convert(_model("cuda:1"))
    assert precision.device == torch.device("cuda")
    assert precision.autocast().device == "cuda"


def test_a_model_over_device_types_or_a_second_type_is_refused_in_one_line():
    # layers offloaded to the CPU: whose autocast is the user's to say
    precision = lowbit.Precision("bf16-mixed")
    for _ in range(2):
        with pytest.raises(UsageError, match=r"spread over cpu, cuda, .* given no device") as no:
            precision.convert(_model("cpu", "cuda:0"))
        assert "\n" not in str(no.value)
        assert "fix: lowbit.Precision('bf16-mixed', device='cuda'), or" in str(no.value)
    # the fix: naming the device
    precision = lowbit.Precision("bf16-mixed", device="cuda:0")
    precision.convert(_model("cpu", "cuda:0"))
    assert precision.autocast().device == "cuda"
    # a second model on another device type than the one the first model gave
    precision = lowbit.Precision("bf16-mixed")
    precision.convert(_model("cpu"))
    with pytest.raises(UsageError, match=r"model on cuda, .* computes on cpu, the device of the"):
        precision.convert(_model("cuda:0"))
    precision = lowbit.Precision("bf16-mixed")
    precision.convert(_model("cuda:1"))
    with pytest.raises(
        UsageError, match=r"fix: .*, or lowbit\.Precision\('bf16-mixed', device='cpu'"
    ):
        precision.convert(_model("cpu"))


def test_a_recipe_that_computes_alike_on_any_device_takes_and_refuses_none():
    # Precision("fp32") refused a model over two GPUs or over the CPU and a GPU, and a teacher on
    # another device: fp32 computes alike anywhere (no autocast, no fp16 emulation, no draws)
    precision = lowbit.Precision("fp32")
    for devices in (("cuda:0", "cuda:1"), ("cpu", "cuda:0"), ("cuda:0",), ("cpu",)):
        precision.convert(_model(*devices))
    assert precision.device == torch.device("cpu")
    assert isinstance(precision.autocast(), contextlib.nullcontext)
    # fp32 compute whose layers round stochastically draws from the device's generator: taken
    nvfp4 = lowbit.recipes.get_recipe("nvfp4")
    precision = lowbit.Precision(dataclasses.replace(nvfp4, name="nvfp4-fp32", autocast=None))
    assert precision.compute_dtype == torch.float32
    precision.convert(_model("cuda:0"))
    assert precision.device == torch.device("cuda")


def test_a_refused_model_leaves_the_device_to_the_next():
    # a convert refused (here check_autocast: DeBERTa v1 under autocast) kept the device it took
    # from the refused model, and refused the next model as on "another device"
    refused = _model("cuda:0")
    refused.config = type("Config", (), {"model_type": "deberta"})()
    precision = lowbit.Precision("bf16-mixed")
    with pytest.raises(UsageError, match=r"DeBERTa \(v1\) attention overflows 16 bits"):
        precision.convert(refused)
    assert precision.device == torch.device("cpu")
    precision.convert(_model("cpu"))
    assert precision.autocast().device == "cpu"


@pytest.mark.parametrize("recipe", ["bf16-mixed", "fp8-tensorwise"])
def test_autocast_refuses_a_model_moved_off_the_device_taken_from_it(recipe):
    # a loop of forward passes only (no backward to refuse it) on a model moved after convert ran
    # it without autocast, in fp32
    precision = lowbit.Precision(recipe)
    model = precision.convert(_model("cuda:0"))
    _move(model, "cpu")
    with pytest.raises(UsageError, match=r"autocast\(\) found the model on cpu.* for cuda") as no:
        precision.autocast()
    assert "\n" not in str(no.value)
    fix = "fix: move the model to cpu before precision.convert(model), or lowbit.Precision("
    assert str(no.value).endswith(f"{fix}{recipe!r}, device='cpu')")


@pytest.mark.parametrize("recipe", ["bf16-mixed", "fp8-tensorwise"])
def test_autocast_takes_a_given_device_at_its_word(recipe):
    # FSDP's CPU offloading (FSDP2's CPUOffloadPolicy, FSDP1's offload_params) keeps the
    # parameters on the CPU between steps: Precision(recipe, device="cuda").autocast() refused
    precision = lowbit.Precision(recipe, device="cuda")
    model = precision.convert(_model("cpu"))
    with torch.no_grad(), precision.autocast():
        model(torch.randn(2, 4))
    assert precision.autocast().device == "cuda"


def test_a_loss_on_another_device_than_the_models_names_moving_the_model_first():
    # the model was converted on the CPU, then moved: the fix is to move it before convert
    precision = lowbit.Precision("bf16-mixed")
    precision.convert(_model("cpu"))
    with pytest.raises(UsageError, match=r"fix: move the model to cuda before precision\.convert"):
        precision.backward(_OnDevice((), "cuda:0"))


def test_a_model_without_gemm_layers_is_reported_as_such(caplog):
    # the report (logged at INFO, run.json's "conversion") said "converted 0/0 layers"
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    precision = lowbit.Precision("fp8-tensorwise")
    with caplog.at_level("INFO", logger="lowbit.nn.convert"):
        precision.convert(model)
    summary = precision.conversion_report.summary()
    assert summary.startswith("no GEMM layer found (lowbit converts nn.Linear, nn.Conv2d")
    assert summary.endswith("nothing converted")
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
        f"convert, recipe fp8-tensorwise: {summary}"
    ]
    # a recipe that converts no layer, whatever the model holds (bf16-low computes in bf16)
    precision = lowbit.Precision("bf16-low")
    precision.convert(_model("cpu", "cpu"))
    assert precision.conversion_report.summary().startswith("no layer converted: the recipe")


def _llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64, hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=2048,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _cos_sin_error(model, reference, positions) -> torch.Tensor:
    """The largest error of the model's rotary cos and sin (computed in fp32) at each position."""
    x, positions = torch.zeros(1), torch.tensor([positions])
    (cos, sin), (cos_ref, sin_ref) = (m.model.rotary_emb(x, positions) for m in (model, reference))
    return torch.maximum((cos - cos_ref).abs(), (sin - sin_ref).abs()).amax(-1)[0]


@pytest.mark.parametrize(
    ("recipe", "cast_errors"), [("bf16-low", [0, 0.17, 0.86]), ("fp16-low", [0, 0.07, 0.32])]
)
def test_16_bit_parameters_leave_the_rotary_frequencies_in_fp32(recipe, cast_errors):
    # Rounded to 16 bits with the parameters (as from_pretrained(..., dtype=bfloat16) does not),
    # the frequencies put the rotary angle of position p off by p times their error: cos/sin at
    # positions 0, 512 and 2047 of the model cast as a whole (as convert cast it) against the
    # converted model's, which are those of the fp32 model
    reference, positions = _llama(), [0, 512, 2047]
    precision = lowbit.Precision(recipe)
    model = precision.convert(_llama())
    cast = _cos_sin_error(_llama().to(precision.param_dtype), model, positions)
    assert cast.tolist() == pytest.approx(cast_errors, abs=0.005)
    assert {b.dtype for b in model.model.rotary_emb.buffers()} == {torch.float32}
    assert _cos_sin_error(model, reference, positions).tolist() == [0.0, 0.0, 0.0]
    # the parameters are 16-bit, and so is the forward: cos/sin come out in the activations' dtype
    assert {p.dtype for p in model.parameters()} == {precision.param_dtype}
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    ids = torch.randint(0, 64, (2, 16))
    with precision.autocast():
        out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == precision.param_dtype and out.loss.isfinite()
    precision.backward(out.loss)
    assert precision.step(optimizer)
    # a module of the user's own with such a buffer is cast, as model.to casts it: lowbit cannot
    # know that its forward computes in fp32 (kept so, its result would turn the activations fp32)
    own = nn.Module()
    own.inv_freq = nn.Buffer(torch.rand(4), persistent=False)
    assert lowbit.Precision(recipe).convert(nn.Sequential(own))[0].inv_freq.dtype == model.dtype
    # and so is one of a trust_remote_code model's own code (transformers_modules.*): was kept
    remote = type("RotaryEmbedding", (nn.Module,), {"__module__": "transformers_modules.acme.m"})()
    remote.inv_freq = nn.Buffer(torch.rand(4), persistent=False)
    converted = lowbit.Precision(recipe).convert(nn.Sequential(remote))
    assert converted[0].inv_freq.dtype == model.dtype
