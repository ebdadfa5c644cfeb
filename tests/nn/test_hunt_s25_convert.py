"""Layer conversion and torch.func on converted models (session 25's bug hunt): a module shared
between a converted place and a kept head, routers' reasons, torch.func's transforms."""

import copy

import pytest
import torch
import transformers
from torch.func import functional_call, grad, jacrev, jvp, vmap

import lowbit
from lowbit.errors import UsageError
from lowbit.nn import LowbitLinear
from lowbit.recipes import get_recipe, parse_override

RECIPES = ["fp8-tensorwise", "int8", "mxfp8"]


def mlp(recipe, bias=True):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 16, bias=bias), torch.nn.Tanh(), torch.nn.Linear(16, 4, bias=bias)
    )
    lowbit.convert(model, recipe)
    return model


def cnn(recipe):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 6 * 6, 16),
        torch.nn.Tanh(),
    )
    lowbit.convert(model, recipe)
    return model


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("build", [mlp, cnn])
def test_torch_func_grad_of_a_converted_model_has_autograds_bits(recipe, build):
    """``torch.func.grad`` of a ``functional_call`` failed: "an autograd.Function with functorch
    transforms ... must override the setup_context staticmethod"."""
    model = build(recipe)
    x = torch.randn(4, 5, 32) if build is mlp else torch.randn(4, 3, 8, 8)
    reference = copy.deepcopy(model)
    reference(x).pow(2).sum().backward()
    params = {name: p.detach() for name, p in model.named_parameters()}
    grads = grad(lambda p: functional_call(model, p, (x,)).pow(2).sum())(params)
    for name, p in reference.named_parameters():
        assert torch.equal(grads[name], p.grad), name

    reference.requires_grad_(False)
    x_leaf = x.clone().requires_grad_()
    reference(x_leaf).pow(2).sum().backward()
    assert torch.equal(grad(lambda x: model(x).pow(2).sum())(x), x_leaf.grad)


@pytest.mark.parametrize("recipe", ["fp8-tensorwise", "int8"])
def test_a_second_derivative_through_torch_func_grad_is_refused(recipe):
    """Nested (``grad`` of ``grad``), and ordinary autograd through what ``torch.func.grad``
    returned: refused with the fix, as with ``create_graph=True``, never a silent zero."""
    model = mlp(recipe)
    x = torch.randn(8, 32)
    with pytest.raises(UsageError, match=r"differentiate twice.*fix: "):
        grad(lambda x: grad(lambda x: model(x).sum())(x).pow(2).sum())(x)
    last = model[2:]  # its grad_out needs no graph
    grad_x = grad(lambda h: last(h).sum())(torch.randn(8, 16))
    with pytest.raises(UsageError, match="differentiate twice"):
        grad_x.pow(2).sum().backward()


@pytest.mark.parametrize(
    "transform",
    [
        lambda model, x: vmap(model)(x),
        lambda model, x: jacrev(lambda x: model(x).sum(0))(x),
        lambda model, x: jvp(model, (x,), (torch.ones_like(x),)),
    ],
    ids=["vmap", "jacrev", "jvp"],
)
def test_torch_func_transforms_a_quantization_cannot_follow_are_refused_in_one_line(transform):
    """vmap failed on setup_context too, and jacrev (a vmap over the backward) would have
    quantized every mapped cotangent with one scale."""
    model = mlp("fp8-tensorwise")
    with pytest.raises(UsageError, match="fix: ") as error:
        transform(model, torch.randn(4, 32))
    assert "\n" not in str(error.value)


class TiedHead(torch.nn.Module):
    """A body whose last layer is also the head (the same module), registered in either order."""

    def __init__(self, head_first: bool):
        super().__init__()
        shared = torch.nn.Linear(8, 8)
        if head_first:
            self.lm_head = shared
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 8), shared)
        self.lm_head = shared

    def forward(self, x):
        return self.lm_head(self.body(x))


@pytest.mark.parametrize("head_first", [False, True])
def test_a_module_shared_by_a_converted_place_and_a_kept_head_is_kept(head_first):
    """Decided by whichever place came first: with the body first, the head computed in fp8."""
    model = TiedHead(head_first)
    report = lowbit.convert(model, "fp8-tensorwise")
    assert type(model.lm_head) is torch.nn.Linear and model.body[1] is model.lm_head
    assert isinstance(model.body[0], LowbitLinear)
    (reason,) = report.kept.values()
    assert "lm_head: output head kept in high precision" in reason and "body.1: converted" in reason


def test_an_override_of_a_shared_modules_later_place_decides_and_is_not_unused():
    lin = torch.nn.Linear(8, 8)
    model = torch.nn.Sequential(lin, torch.nn.Tanh(), lin)
    recipe = get_recipe("fp8-tensorwise")
    report = lowbit.convert(model, recipe.with_overrides(parse_override("2=keep", recipe)))
    assert model[0] is lin and model[2] is lin
    assert report.unused_overrides == [] and "2: override 2=keep" in report.kept["0"]


def ergo():
    config = transformers.ErgoConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, first_dense_intermediate_size=16, num_dense_blocks=1,
        moe_intermediate_size=8, shared_intermediate_size=8, num_experts=2, num_experts_per_tok=1,
    )  # fmt: skip
    return transformers.ErgoForCausalLM(config)


def granite_docling():
    text = dict(
        vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    vision = dict(
        hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=16, out_hidden_size=16,
    )  # fmt: skip
    config = transformers.GraniteDoclingConfig(
        text_config=text, vision_config=vision, density_router_hidden_size=8, pad_token_id=0,
        image_token_id=3,
    )  # fmt: skip
    return transformers.GraniteDoclingForConditionalGeneration(config)


def test_routers_and_heads_that_subclass_nn_linear_are_kept_as_routers_and_heads():
    """Ergo's router layer and output head (``ErgoLinearWithFP32Output``, an nn.Linear subclass)
    were kept as "subclasses nn.Linear and may compute otherwise"."""
    torch.manual_seed(0)
    report = lowbit.convert(ergo(), "fp8-tensorwise")
    assert report.kept == {
        "model.layers.1.mlp.gate.linear": "mixture-of-experts router kept in high precision",
        "lm_head": "output head kept in high precision",
    }


def test_a_router_of_no_mixture_of_experts_is_not_called_one():
    """GraniteDocling's ``density_router`` (a coarse or fine path for each sample) was kept as a
    "mixture-of-experts router"."""
    torch.manual_seed(0)
    report = lowbit.convert(granite_docling(), "fp8-tensorwise")
    routers = {name: reason for name, reason in report.kept.items() if "density_router" in name}
    assert set(routers) == {f"model.density_router.{name}" for name in ("att", "fc1", "fc2")}
    assert all(reason.startswith("router kept in high precision") for reason in routers.values())


@pytest.mark.parametrize(
    "parametrize",
    [
        lambda layer: torch.nn.utils.parametrize.register_parametrization(
            layer, "weight", torch.nn.Identity()
        ),
        torch.nn.utils.parametrizations.weight_norm,
        torch.nn.utils.parametrizations.spectral_norm,
    ],
    ids=["parametrize", "weight_norm", "spectral_norm"],
)
def test_a_parametrized_layer_is_kept_as_one_whose_weight_is_computed(parametrize):
    """torch.nn.utils.parametrize makes the layer a ``ParametrizedLinear``, kept as "subclasses
    nn.Linear and may compute otherwise" where docs/recipes.md names its computed weight."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    parametrize(model[0])
    report = lowbit.convert(model, "fp8-tensorwise")
    assert report.kept == {
        "0": "its weight is computed by a parametrization (weight): not converted"
    }
