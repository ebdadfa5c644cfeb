"""Converted layers under deferred initialisation: a model built on the meta device, converted,
``to_empty``, then ``reset_parameters`` on every module that has one (FSDP2's and torchtitan's
flow); a forward on meta (shape inference); copies and dtype casts of a converted model."""

import copy
import pickle

import pytest
import torch

import lowbit
from lowbit import Precision
from lowbit.errors import UsageError
from lowbit.nn.linear import LowbitConv1D, LowbitLinear, LowbitModule
from lowbit.recipes.recipe import OperandSpec, uniform_layer

RECIPES = ["fp8-tensorwise", "fp8-delayed", "int8", "mxfp8"]


def _cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 5),
    )


def _initialise(model):
    """What deferred initialisation does after ``to_empty`` (torchtitan, FSDP2's examples)."""
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()


def _deferred(recipe, convert_on_meta=False):
    """``_cnn`` built on meta and converted by a `Precision` (inside the meta context when
    ``convert_on_meta``), then ``to_empty`` and initialised from seed 0."""
    precision = Precision(recipe)
    with torch.device("meta"):
        model = _cnn()
        if convert_on_meta:
            model = precision.convert(model)
    if not convert_on_meta:
        model = precision.convert(model)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    _initialise(model)
    return model, precision


def _train(model, precision, steps=4):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
        with precision.autocast():
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        precision.backward(loss)
        precision.step(optimizer)
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("recipe", RECIPES)
def test_converted_layers_initialise_as_the_unconverted_model_through_the_same_flow(recipe):
    plain, _ = _deferred("fp32")  # converts no layer: nn.Linear's and nn.Conv2d's own init
    converted, _ = _deferred(recipe)
    assert all(isinstance(converted[i], LowbitModule) for i in (0, 3))  # 5: the head, kept
    for (name, a), b in zip(plain.named_parameters(), converted.parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("convert_on_meta", [False, True])
@pytest.mark.parametrize("recipe", ["fp8-delayed", "fp8-tensorwise", "int8"])
def test_training_after_deferred_init_equals_a_model_built_in_place(recipe, convert_on_meta):
    torch.manual_seed(0)
    precision = Precision(recipe)
    expected = _train(precision.convert(_cnn()), precision)
    losses = _train(*_deferred(recipe, convert_on_meta))
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses == expected


def test_a_conv1d_initialises_as_transformers_draws_it():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    expected = Conv1D(12, 8)
    with torch.device("meta"):
        model = torch.nn.Sequential(Conv1D(12, 8))
    lowbit.convert(model, "fp8-tensorwise")
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    _initialise(model)
    assert isinstance(model[0], LowbitConv1D)
    assert torch.equal(model[0].weight, expected.weight) and torch.equal(
        model[0].bias, expected.bias
    )


def test_reset_parameters_forgets_the_amax_histories_of_the_old_weights():
    model, precision = _deferred("fp8-delayed")
    _train(model, precision)
    assert any(
        h.filled
        for m in model.modules()
        if isinstance(m, LowbitModule)
        for h in m.lowbit_state.histories.values()
    )
    _initialise(model)
    for m in model.modules():
        if isinstance(m, LowbitModule):
            for h in m.lowbit_state.histories.values():
                assert h.filled == 0 and not h.delayed and h.pending is None
                assert not h.history.any() and h.recording


@pytest.mark.parametrize("recipe", [*RECIPES, "fp32 layers"])
def test_a_forward_on_meta_gives_the_unconverted_shapes_and_dtypes(recipe):
    with torch.device("meta"):
        plain, model = _cnn(), _cnn()
    if (
        recipe == "fp32 layers"
    ):  # a converted layer whose operands are all fp32 (F.linear, F.conv2d)
        spec = uniform_layer(OperandSpec("fp32"))
        model[3] = LowbitLinear(model[3], spec)
    else:
        lowbit.convert(model, recipe)
    x = torch.randn(2, 3, 6, 6, device="meta", requires_grad=True)
    out = model(x)
    assert out.is_meta and out.shape == plain(x).shape and out.dtype == torch.float32
    out.sum().backward()
    assert x.grad.is_meta and model[3].weight.grad.shape == model[3].weight.shape


@pytest.mark.parametrize("recipe", ["fp8-tensorwise", "int8"])
def test_meta_weights_with_a_real_input_are_refused_in_one_line(recipe):
    with torch.device("meta"):
        model = _cnn()
    lowbit.convert(model, recipe)
    with pytest.raises(UsageError, match="to_empty") as error:  # int8 returned garbage
        model(torch.randn(2, 3, 6, 6))
    assert isinstance(error.value, RuntimeError) and "\n" not in str(error.value)


@pytest.mark.parametrize("recipe", ["fp8-tensorwise", "int8"])
def test_a_meta_bias_with_a_real_weight_and_input_is_refused(recipe):
    """Only the input and weight were checked: a bias left on meta gave wrong numbers."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 16))
    lowbit.convert(model, recipe)
    model[0].bias = torch.nn.Parameter(torch.empty(16, device="meta"))
    with pytest.raises(UsageError, match="to_empty"):
        model(torch.randn(4, 32))


def test_copies_and_dtype_casts_of_a_trained_converted_model_keep_working():
    model, precision = _deferred("fp8-delayed")
    _train(model, precision)
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(copied(x), expected)
        history = copied[3].lowbit_state.histories["forward.w"]
        assert history is not model[3].lowbit_state.histories["forward.w"]
    for dtype in (torch.bfloat16, torch.float16):
        out = copy.deepcopy(model).to(dtype)(x.to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()


def test_a_model_converted_on_meta_trains_after_loading_its_weights():
    """Weights loaded after ``to_empty`` (no ``reset_parameters``): the delayed-scaling histories,
    made when the model was converted on meta, are CPU tensors, not meta ones that failed at the
    first commit ("Cannot copy out of meta tensor")."""
    torch.manual_seed(0)
    reference = _cnn()
    weights = copy.deepcopy(reference.state_dict())
    precision = Precision("fp8-delayed")
    expected = _train(precision.convert(reference), precision)
    precision = Precision("fp8-delayed")
    with torch.device("meta"):
        model = precision.convert(_cnn())
    model.to_empty(device="cpu")
    model.load_state_dict(weights)
    assert _train(model, precision) == expected
