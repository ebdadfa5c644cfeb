"""Quantizing weights that hold inf or NaN: one line naming the layer, the model unchanged.

Before: MXFP4 failed with a traceback ("fp4_to_codes: a value is not an fp4 e2m1 number": e2m1 has
no NaN), and the other formats wrote a folder whose blocks dequantize to NaN or whose scale is
inf without a word."""

import pytest
import torch
from transformers import LlamaForCausalLM

from lowbit.errors import UsageError
from lowbit.infer import quantize_model
from lowbit.infer.quant import QuantRecipe
from lowbit.models.causal_lm import model_config

GROUPS = {"int8": None, "int4": 32, "fp8": None, "mxfp4": 32, "nvfp4": 16}


@pytest.mark.parametrize("target", list(GROUPS))
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_weights_holding_inf_or_nan_are_refused_naming_the_layer(target, bad):
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config("nano", 257))
    model.model.layers[0].mlp.up_proj.weight.data[3, 7] = bad
    recipe = QuantRecipe.from_dict(
        {
            "format": target,
            "mode": "weights-only",
            "group_size": GROUPS[target],
            "pad_groups": True,
        }
    )
    with pytest.raises(UsageError, match=r"model\.layers\.0\.mlp\.up_proj: its weight holds inf"):
        quantize_model(model, recipe)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
