"""Session 26's sweep of the Hugging Face architectures a user brings, built from tiny configs
(no downloads), converted by `lowbit.convert` and trained."""

import pytest
import torch

import lowbit

MAMBA = {"hidden_size": 32, "num_hidden_layers": 2, "state_size": 4, "expand": 2}
MOBILEBERT = {"hidden_size": 32, "embedding_size": 16, "num_hidden_layers": 1}
MOBILEBERT |= {"num_attention_heads": 2, "intermediate_size": 64, "intra_bottleneck_size": 32}


def _model(config_class: str, auto_class: str = "AutoModelForCausalLM", **fields):
    import transformers

    config = getattr(transformers, config_class)(vocab_size=64, **fields)
    torch.manual_seed(0)
    return getattr(transformers, auto_class).from_config(config)


@pytest.mark.parametrize(
    ("config_class", "auto_class", "fields", "kept", "reader"),
    [
        ("MambaConfig", None, MAMBA, "backbone.layers.1.mixer.dt_proj", "MambaMixer"),
        ("FalconMambaConfig", None, MAMBA, "backbone.layers.1.mixer.dt_proj", "FalconMambaMixer"),
        ("MobileBertConfig", "AutoModelForMaskedLM", MOBILEBERT, "cls.predictions.dense",
         "MobileBertLMPredictionHead"),
    ],
)  # fmt: skip
def test_every_layer_reported_converted_runs_in_the_forward(
    config_class, auto_class, fields, kept, reader
):
    """The Mamba mixers multiply by ``dt_proj.weight`` themselves, never calling ``dt_proj``
    (MobileBERT's masked-LM head by its ``dense.weight``): it was reported converted, and its
    GEMM ran in fp32 in every recipe."""
    model = _model(config_class, auto_class or "AutoModelForCausalLM", **fields)
    report = lowbit.convert(model, "fp8-tensorwise")
    called = set()
    for name, layer in model.named_modules():
        if name in report.converted:
            layer.register_forward_hook(lambda *_, name=name: called.add(name))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 64, (2, 8)))
    assert called == set(report.converted)
    assert report.kept[kept].startswith(f"{reader} multiplies by its weight itself")
