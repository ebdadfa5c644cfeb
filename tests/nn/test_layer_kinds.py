"""The linear layers of other model families convert like nn.Linear: transformers' Conv1D (GPT-2's
projections, weight stored in x out) and Falcon's FalconLinear; every GEMM module lowbit does not
convert shows up in the conversion report."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from lowbit import Precision, convert, get_recipe
from lowbit.formats.error import sqnr
from lowbit.nn import LowbitConv1D, LowbitLinear

# Every kind of operand handling: tensorwise (reused in the backward), delayed, row-wise, int8,
# 1-D and 16x16 blocks, stochastic rounding and Hadamard transforms, fp16 GEMM emulation.
RECIPES = ["fp8-tensorwise", "fp8-delayed", "fp8-rowwise", "int8", "fp8-blockwise", "mxfp8"]
RECIPES += ["mxfp4", "nvfp4", "fp16-mixed"]


def run(layer, x, grad, seed=0):
    x = x.detach().clone().requires_grad_()
    layer.weight.grad = None
    torch.manual_seed(seed)  # the same stochastic rounding draws for both layers
    out = layer(x)
    out.backward(grad)
    return out.detach(), x.grad.detach(), layer.weight.grad.detach().clone()


@pytest.mark.parametrize("recipe", RECIPES)
def test_conv1d_computes_the_bits_of_the_linear_layer_with_its_transposed_weight(recipe):
    torch.manual_seed(0)
    conv1d = Conv1D(344, 128)  # nf (out), nx (in): weight 128 x 344
    with torch.no_grad():
        conv1d.bias.normal_()
    linear = torch.nn.Linear(128, 344)
    with torch.no_grad():
        linear.weight.copy_(conv1d.weight.t())
        linear.bias.copy_(conv1d.bias)
    x = torch.randn(4, 64, 128) * torch.exp(torch.randn(4, 64, 1))
    grad = torch.randn(4, 64, 344) * 1e-3
    spec = get_recipe(recipe).compute_layer
    converted, reference = LowbitConv1D(conv1d, spec), LowbitLinear(linear, spec)
    for step in range(2):  # the second step reads delayed scaling's history of the first
        out, grad_x, grad_w = run(converted, x, grad, seed=step)
        ref_out, ref_grad_x, ref_grad_w = run(reference, x, grad, seed=step)
        assert torch.equal(out, ref_out)
        assert torch.equal(grad_x, ref_grad_x)
        assert grad_w.shape == (128, 344)  # the Parameter's own layout
        assert torch.equal(grad_w, ref_grad_w.t())
        for layer in (converted, reference):
            layer.lowbit_state.commit()  # delayed scaling: this step's amaxes enter the history
    assert sqnr(ref_out, torch.nn.functional.linear(x, linear.weight, linear.bias)) > 10


def tiny_gpt2(layers=3):
    config = GPT2Config(n_layer=layers, n_embd=64, n_head=2, vocab_size=96, n_positions=64)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


def test_convert_swaps_gpt2_conv1d_keeping_parameters_and_checkpoint_layout():
    model = tiny_gpt2()
    params = dict(model.named_parameters())
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    report = convert(model, "fp8-tensorwise")
    names = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    projections = {f"transformer.h.{i}.{name}" for i in range(3) for name in names}
    assert set(report.converted) == projections
    assert set(report.kept) == {"lm_head"}
    assert isinstance(model.transformer.h[2].mlp.c_fc, LowbitConv1D)
    assert all(p is params[name] for name, p in model.named_parameters())
    assert {name: t.shape for name, t in model.state_dict().items()} == shapes


def test_gpt2_trains_in_fp8_close_to_its_bf16_mixed_run():
    tokens = torch.randint(0, 96, (4, 33), generator=torch.Generator().manual_seed(1))

    def losses(recipe):
        model = tiny_gpt2()
        precision = Precision(recipe)
        model = precision.convert(model)
        optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
        out = []
        for _ in range(4):
            with precision.autocast():
                loss = model(tokens[:, :-1], labels=tokens[:, :-1]).loss
            precision.backward(loss)
            precision.step(optimizer)
            optimizer.zero_grad()
            out.append(loss.item())
        return out

    reference, fp8 = losses("bf16-mixed"), losses("fp8-tensorwise")
    assert fp8[-1] < fp8[0]
    assert all(abs(a - b) < 0.02 * b for a, b in zip(fp8, reference))


class ScaledLinear(torch.nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_gemm_modules_that_are_not_converted_are_reported_with_a_reason():
    model = torch.nn.Sequential(
        torch.nn.MultiheadAttention(8, 2),  # in-projection computed from its own weights
        torch.nn.Conv1d(8, 8, 3),
        ScaledLinear(8, 8),  # a subclass may compute otherwise: not swapped for LowbitLinear
        torch.nn.Linear(8, 8),
    )
    report = convert(model, "fp8-tensorwise")
    assert list(report.converted) == ["3"]
    assert set(report.kept) == {"0", "1", "2"}  # out_proj is a part of the attention
    assert "MultiheadAttention is not converted" in report.kept["0"]
    assert "Conv1d is not converted" in report.kept["1"]
    assert "subclasses nn.Linear" in report.kept["2"]
    assert type(model[2]) is ScaledLinear
    assert report.summary().startswith("converted 1/4 layers")


def test_falcon_linear_layers_are_converted():
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=64)
    model = FalconForCausalLM(config)
    report = convert(model, "fp8-tensorwise")
    names = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h")
    names += ("mlp.dense_4h_to_h",)
    assert set(report.converted) == {f"transformer.h.{i}.{n}" for i in range(2) for n in names}
    assert set(report.kept) == {"lm_head"}
    ids = torch.randint(0, 64, (2, 12))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert model.transformer.h[1].mlp.dense_4h_to_h.weight.grad is not None


def test_convert_logs_its_report(caplog):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Conv1d(8, 8, 3))
    with caplog.at_level("INFO", logger="lowbit.nn.convert"):
        report = convert(model, "fp8-tensorwise")
    (record,) = caplog.records
    assert record.getMessage() == f"convert, recipe fp8-tensorwise: {report.summary()}"
    assert "converted 1/2 layers" in record.getMessage()


def test_presets_keep_the_output_head_under_any_name_and_moe_routers():
    """BioGPT's head is ``output_projection`` (found by get_output_embeddings, not its name);
    Qwen2-MoE's ``shared_expert_gate`` is a router, a plain nn.Linear."""
    import transformers

    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    biogpt = transformers.BioGptForCausalLM(
        transformers.BioGptConfig(**small, intermediate_size=64, vocab_size=100)
    )
    report = convert(biogpt, "fp8-tensorwise")
    assert report.kept == {"output_projection": "output head kept in high precision"}
    moe = transformers.Qwen2MoeForCausalLM(
        transformers.Qwen2MoeConfig(
            **small,
            num_key_value_heads=2,
            intermediate_size=64,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            vocab_size=100,
        )
    )
    report = convert(moe, "mxfp8")
    gates = [name for name in report.kept if name.endswith("shared_expert_gate")]
    assert len(gates) == 2 and "router kept in high precision" in report.kept[gates[0]]
    assert "lm_head" in report.kept
