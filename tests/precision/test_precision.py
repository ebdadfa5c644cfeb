"""The Precision hooks: identity with plain PyTorch, loss scaling, update rounding, resume."""

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lowbit import Precision, get_recipe


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )


def batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen))
        for _ in range(n)
    ]


def lowbit_loop(recipe, model, data, lr=1e-2, clip=1.0, precision=None, optimizer=None):
    precision = precision or Precision(recipe)
    if optimizer is None:
        model = precision.convert(model)
        optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=lr))
    losses, scales = [], []
    for x, y in data:
        with precision.autocast():
            loss = F.cross_entropy(model(x.to(next(model.parameters()).dtype)).float(), y)
        precision.backward(loss)
        precision.clip_grad_norm_(optimizer, clip)
        precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        scales.append(precision.loss_scale)
    return losses, scales, model, precision, optimizer


def test_fp32_is_bit_identical_to_plain_pytorch():
    data = batches(8)
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    plain = []
    for x, y in data:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        plain.append(loss.item())
    losses, _, lowbit_model, _, _ = lowbit_loop("fp32", mlp(), data)
    assert losses == plain
    for a, b in zip(model.parameters(), lowbit_model.parameters()):
        assert torch.equal(a, b)


def test_bf16_mixed_is_torch_autocast():
    data = batches(6)
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    plain = []
    for x, y in data:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        plain.append(loss.item())
    losses, _, _, _, _ = lowbit_loop("bf16-mixed", mlp(), data)
    assert losses == plain


def test_fp16_mixed_tracks_autocast_and_grad_scaler():
    # A huge initial scale forces several overflow back-offs: both loops must skip the same steps.
    recipe = replace(get_recipe("fp16-mixed"), initial_loss_scale=2.0**40)
    data = batches(10)
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    plain, plain_scales = [], []
    for x, y in data:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        plain.append(loss.item())
        plain_scales.append(scaler.get_scale())
    losses, scales, _, precision, _ = lowbit_loop(recipe, mlp(), data)
    assert scales == plain_scales
    assert plain_scales[0] < 2.0**40  # the trajectory did back off
    assert precision.skipped_steps == sum(1 for a, b in zip([2.0**40, *scales], scales) if b < a)
    # fp16 rounding happens at different places (emulated at GEMM boundaries vs CPU fp16
    # kernels), so losses agree to fp16 precision, not bitwise.
    for ours, theirs in zip(losses, plain):
        assert ours == pytest.approx(theirs, rel=2e-3)


def test_loss_scale_settings_follow_grad_scaler():
    """``--loss-scale`` / ``--loss-scale-growth-interval`` (TrainConfig fields) start and grow the
    dynamic scale as GradScaler's ``init_scale`` / ``growth_interval`` do."""
    from lowbit.train.config import TrainConfig, recipe_of

    config = TrainConfig(recipe="fp16-mixed", loss_scale=1024.0, loss_scale_growth_interval=3)
    data = batches(10)
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    plain_scales = []
    for x, y in data:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        plain_scales.append(scaler.get_scale())
    _, scales, *_ = lowbit_loop(recipe_of(config), mlp(), data)
    assert scales == plain_scales == [1024.0 * 2 ** ((i + 1) // 3) for i in range(10)]


@pytest.mark.parametrize("recipe", ["fp16-mixed", "fp16-low"])
def test_injected_overflow_skips_the_step_and_halves_the_scale(recipe):
    precision = Precision(recipe)
    model = precision.convert(mlp())
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    scale = precision.loss_scale
    with precision.autocast():
        loss = F.cross_entropy(model(x.to(before[0].dtype)).float(), y)
    precision.backward(loss)
    next(model.parameters()).grad[0, 0] = float("inf")
    assert precision.step(optimizer) is False
    assert precision.loss_scale == scale / 2
    assert precision.skipped_steps == 1
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b) and p.dtype == b.dtype


def small_update_trajectory(recipe, steps=200):
    """Weights ~1, a gradient of 1 and lr 1e-4: each update is 1/78 of a bf16 ulp at 1.0."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(1 + 0.01 * torch.rand(4096))
    model = torch.nn.Module()
    model.weight = weight
    precision = Precision(recipe)
    precision.convert(model)
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=1e-4))
    start = model.weight.detach().float().clone()
    for _ in range(steps):
        (model.weight.float().sum()).backward()  # gradient 1 everywhere
        precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    return start, model.weight.detach().float()


def test_small_updates_stall_in_pure_bf16_but_not_with_sr_or_kahan():
    expected_drift = 200 * 1e-4  # fp32 trajectory: w0 - steps * lr
    start, pure = small_update_trajectory("bf16-pure")
    assert torch.equal(pure, start)  # every update rounded away
    for recipe in ("bf16-pure-sr", "bf16-pure-kahan", "bf16-low"):
        start, end = small_update_trajectory(recipe)
        drift = (start - end).mean().item()
        assert drift == pytest.approx(expected_drift, rel=0.05), recipe


def test_stochastic_rounding_writes_bf16_values_and_kahan_keeps_a_buffer():
    _, end = small_update_trajectory("bf16-pure-sr", steps=5)
    assert torch.equal(end.bfloat16().float(), end)
    precision = Precision("bf16-pure-kahan")
    model = precision.convert(mlp())
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    lowbit_loop(None, model, batches(2), precision=precision, optimizer=optimizer)
    buffers = precision.state_dict()["update"]["compensation"]
    assert len(buffers) == len(list(model.parameters()))
    assert all(b.dtype == torch.bfloat16 for b in buffers.values())


@pytest.mark.parametrize("precision_first", [False, True])
@pytest.mark.parametrize(
    "recipe",
    ["fp16-low", "bf16-pure-kahan", "bf16-pure-sr", "fp8-delayed", "fp16-mixed", "mxfp4", "nvfp4"],
)
def test_state_dict_resume_is_bit_identical(recipe, precision_first):
    """Also when the precision state is loaded first, before convert and wrap_optimizer: its
    master weights, Kahan buffers and amax histories wait for their optimizer and model. The loop
    saves no torch generator state and builds its fresh model from another seed: stochastic
    rounding (bf16-pure-sr's update, mxfp4's and nvfp4's gradients) continues its draws because
    the precision state holds where they stood."""
    data = batches(8)
    straight, _, straight_model, _, _ = lowbit_loop(recipe, mlp(), data)

    first, _, model, precision, optimizer = lowbit_loop(recipe, mlp(), data[:4])
    saved = copy.deepcopy(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "precision": precision.state_dict(),
        }
    )
    fresh_precision = Precision(recipe)
    if precision_first:
        fresh_precision.load_state_dict(saved["precision"])
    fresh_model = fresh_precision.convert(mlp(seed=123))  # draws from torch's generator
    fresh_model.load_state_dict(saved["model"])
    fresh_optimizer = fresh_precision.wrap_optimizer(
        torch.optim.AdamW(fresh_model.parameters(), lr=1e-2)
    )
    fresh_optimizer.load_state_dict(saved["optimizer"])
    if not precision_first:
        fresh_precision.load_state_dict(saved["precision"])
    second, _, resumed_model, _, _ = lowbit_loop(
        recipe, fresh_model, data[4:], precision=fresh_precision, optimizer=fresh_optimizer
    )
    assert first + second == straight
    for a, b in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_a_deterministic_recipe_leaves_torchs_generator_alone():
    """Only a recipe that draws random numbers saves and restores torch's generator."""
    precision = Precision("fp8-tensorwise")
    model = precision.convert(mlp())
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    lowbit_loop(None, model, batches(2), precision=precision, optimizer=optimizer)
    state = precision.state_dict()
    assert "rng" not in state
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    precision.load_state_dict(state)
    assert torch.equal(torch.rand(3), expected)


def test_delayed_scaling_history_is_saved_and_used():
    precision = Precision("fp8-delayed")
    model = precision.convert(mlp())
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    lowbit_loop(None, model, batches(3), precision=precision, optimizer=optimizer)
    layers = precision.state_dict()["layers"]
    assert set(layers) == {"0", "2", "4"}
    history = layers["0"]["forward.x"]
    assert history["filled"] == 3 and (history["history"][:3] > 0).all()
    # Transformer Engine's three histories: the backward GEMMs reuse the forward's fp8 input and
    # weight (transposed) with their scales, and one grad_out quantization serves both gradients.
    assert set(layers["0"]) == {"forward.x", "forward.w", "grad_input.grad_out"}
    assert layers["0"]["grad_input.grad_out"]["filled"] == 3


def test_evaluation_batches_do_not_enter_the_delayed_scaling_history():
    """In eval mode the layers quantize with the history's scale but record nothing: a huge
    evaluation batch between two training steps leaves the next step's history as it was."""
    data = batches(3)
    plain_precision, with_eval_precision = Precision("fp8-delayed"), Precision("fp8-delayed")
    plain, with_eval = plain_precision.convert(mlp()), with_eval_precision.convert(mlp())
    for precision, model in ((plain_precision, plain), (with_eval_precision, with_eval)):
        optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
        lowbit_loop(None, model, data[:2], precision=precision, optimizer=optimizer)
        if model is with_eval:
            model.eval()
            with torch.no_grad(), precision.autocast():
                model(data[0][0] * 1000)
            model.train()
        lowbit_loop(None, model, data[2:], precision=precision, optimizer=optimizer)
    expected, got = (
        plain_precision.state_dict()["layers"],
        with_eval_precision.state_dict()["layers"],
    )
    for layer in expected:
        for name in expected[layer]:
            assert torch.equal(expected[layer][name]["history"], got[layer][name]["history"])


def test_master_weights_are_fp32_and_params_16_bit():
    precision = Precision("bf16-low")
    model = precision.convert(mlp())
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    lowbit_loop(None, model, batches(2), precision=precision, optimizer=optimizer)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    masters = precision.state_dict()["update"]["masters"]
    assert len(masters) == 6 and all(m.dtype == torch.float32 for m in masters.values())
    for p, m in zip(model.parameters(), masters.values()):
        assert torch.equal(p, m.to(torch.bfloat16))


def test_finite_loss_policy_follows_loss_scaling():
    assert Precision("fp16-mixed").finite_loss_policy == "skip"
    assert Precision("bf16-mixed").finite_loss_policy == "stop"


def _with(recipe_name, *texts):
    from lowbit.recipes import parse_override

    recipe = get_recipe(recipe_name)
    return recipe.with_overrides(*(parse_override(t, recipe) for t in texts))


def test_fp32_override_under_autocast_computes_the_layer_in_fp32():
    """bf16-mixed with ``4=fp32``: the output layer's GEMMs and output are fp32, as in a plain
    fp32 layer fed the same input, while the other layers stay autocast's bf16."""
    model = mlp()
    reference = copy.deepcopy(model)
    precision = Precision(_with("bf16-mixed", "4=fp32"))
    model = precision.convert(model)
    assert list(precision.conversion_report.converted) == ["4"]
    x = batches(1)[0][0]
    with precision.autocast():
        hidden = model[:4](x)
        out = model[4](hidden)
    assert hidden.dtype == torch.bfloat16 and out.dtype == torch.float32
    expected = reference[4](hidden.detach().float())
    assert torch.equal(out, expected)
    out.sum().backward()
    expected.sum().backward()
    assert torch.equal(model[4].weight.grad, reference[4].weight.grad)


def test_preset_override_converts_layers_of_an_autocast_recipe():
    """An override naming a low-precision preset applies under a recipe that converts no layer
    itself (it used to be ignored); ``keep`` leaves the layer to autocast."""
    precision = Precision(_with("bf16-mixed", "0=fp8-tensorwise", "4=keep"))
    model = precision.convert(mlp())
    assert set(precision.conversion_report.converted) == {"0"}
    assert "fp8_e4m3" in precision.conversion_report.converted["0"]
    assert "override" in precision.conversion_report.kept["4"]
    losses, *_ = lowbit_loop(None, model, batches(3), precision=precision)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_operand_override_under_autocast_starts_from_the_compute_dtype():
    """``OPERAND:FORMAT`` changes one operand of what the recipe computes: bf16 under bf16-mixed."""
    recipe = _with("bf16-mixed", "*=grad_weight.grad_out:fp8_e5m2")
    operands = recipe.layer_for("0")[0].operands()
    assert operands["grad_weight.grad_out"].format == "fp8_e5m2"
    assert {operands[name].format for name in operands if name != "grad_weight.grad_out"} == {
        "bf16"
    }


def test_fp32_override_in_a_16_bit_model_returns_its_dtype():
    """Without autocast (bf16 parameters) an fp32 layer computes in fp32 and hands bf16 on."""
    model = mlp()
    precision = Precision(_with("bf16-low", "0=fp32"))
    model = precision.convert(model)
    x = batches(1)[0][0].bfloat16()
    out = model[0](x)
    assert out.dtype == torch.bfloat16
    plain = F.linear(x.float(), model[0].weight.float(), model[0].bias.float())
    assert torch.equal(out, plain.bfloat16())


@pytest.mark.parametrize("recipe", ["fp16-mixed", "bf16-low"])
def test_a_step_skipped_after_measuring_the_norm_leaves_nothing_behind(recipe):
    """A loop that measures the gradient norm and then skips the step (a spike) and zeroes the
    gradients trains as if that batch had never been run."""
    data = batches(3)

    def run(skip_first: bool):
        precision = Precision(recipe)
        model = precision.convert(mlp())
        optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        for index, (x, y) in enumerate(data if skip_first else data[1:]):
            with precision.autocast():
                loss = F.cross_entropy(model(x.to(precision.param_dtype)).float(), y)
            precision.backward(loss)
            precision.clip_grad_norm_(optimizer, None)
            if skip_first and index == 0:
                optimizer.zero_grad()
                continue
            precision.step(optimizer)
            optimizer.zero_grad()
        return model

    for skipped, reference in zip(run(True).parameters(), run(False).parameters()):
        assert torch.equal(skipped, reference)


def test_backward_onto_unscaled_gradients_is_refused_and_unscaled_accumulation_allowed():
    from lowbit.errors import UsageError

    (x, y), (x2, y2) = batches(2)
    for recipe, refused in (("fp16-mixed", True), ("fp32", False)):
        precision = Precision(recipe)
        model = precision.convert(mlp())
        optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        precision.backward(F.cross_entropy(model(x), y))
        precision.clip_grad_norm_(optimizer, 1.0)
        second = F.cross_entropy(model(x2), y2)
        if refused:  # fp16 loss scaling: scaled gradients would land on unscaled ones
            with pytest.raises(UsageError, match="without a step"):
                precision.backward(second)
        else:  # nothing is scaled: more gradients accumulate on the clipped ones, as in PyTorch
            clipped = [p.grad.clone() for p in model.parameters()]
            precision.backward(second)
            assert not torch.equal(next(model.parameters()).grad, clipped[0])
            assert precision.step(optimizer)


def test_two_optimizers_step_with_one_loss_scale_as_grad_scaler():
    """GradScaler's step(a); step(b); update(): an overflow in a's gradients skips a's step only,
    b's gradients are unscaled with the same scale, and the scale halves once."""
    data = batches(1)
    x, y = data[0]

    def overflow(model):
        model[0].weight.grad[0, 0] = float("inf")

    model = mlp()
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    rest = torch.optim.SGD(list(model[2].parameters()) + list(model[4].parameters()), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(model(x).float(), y)
    scaler.scale(loss).backward()
    overflow(model)
    scaler.step(first)
    scaler.step(rest)
    scaler.update()

    precision = Precision("fp16-mixed")
    ours = precision.convert(mlp())
    our_first = precision.wrap_optimizer(torch.optim.SGD(ours[0].parameters(), lr=0.1))
    our_rest = precision.wrap_optimizer(
        torch.optim.SGD(list(ours[2].parameters()) + list(ours[4].parameters()), lr=0.1)
    )
    with precision.autocast():
        loss = F.cross_entropy(ours(x).float(), y)
    precision.backward(loss)
    overflow(ours)
    assert precision.step(our_first) is False
    assert precision.step(our_rest) is True
    assert precision.loss_scale == scaler.get_scale() == 2.0**15
    assert precision.skipped_steps == 1
    assert torch.equal(ours[0].weight, mlp()[0].weight)  # skipped
    for a, b in zip(ours[2:].parameters(), model[2:].parameters()):
        assert a.sub(b).abs().max() <= 1e-3 * b.abs().max()  # fp16 emulated vs autocast kernels
    assert not torch.equal(ours[4].weight, mlp()[4].weight)  # stepped


def test_state_covers_every_wrapped_optimizer_and_converted_model():
    precision = Precision("bf16-low")
    model = precision.convert(mlp())
    first = precision.wrap_optimizer(torch.optim.SGD(model[0].parameters(), lr=1e-3))
    rest = precision.wrap_optimizer(torch.optim.SGD(model[2:].parameters(), lr=1e-3))
    x, y = batches(1)[0]
    precision.backward(F.cross_entropy(model(x.bfloat16()).float(), y))
    precision.step(first, rest)
    assert len(precision.state_dict()["update"]["masters"]) == 6

    delayed = Precision("fp8-delayed")
    student, teacher = delayed.convert(mlp()), delayed.convert(mlp(seed=1))
    optimizer = delayed.wrap_optimizer(torch.optim.SGD(student.parameters(), lr=1e-3))
    with delayed.autocast():
        loss = F.cross_entropy(student(x).float(), y) + teacher(x).float().square().mean()
    delayed.backward(loss)
    delayed.step(optimizer)
    layers = delayed.state_dict()["layers"]
    assert {"0", "1:0"} <= set(layers)  # both models' first layers, told apart
    assert layers["1:0"]["forward.x"]["filled"] == 1  # the teacher's history was committed too


def test_adagrad_states_made_in_its_constructor_are_fp32():
    """Adagrad creates its sum when constructed, from the (16-bit) parameters: the wrapped
    optimizer's states are fp32 like every other optimizer's (in fp16 its eps of 1e-10 is 0,
    and a zero gradient's first step gave 0/0)."""
    precision = Precision("fp16-low")
    model = precision.convert(mlp())
    optimizer = precision.wrap_optimizer(torch.optim.Adagrad(model.parameters(), lr=1e-2))
    assert {state["sum"].dtype for state in optimizer.state.values()} == {torch.float32}
    for x, y in batches(3):
        precision.backward(F.cross_entropy(model(x.half()).float(), y))
        model[0].bias.grad.zero_()  # a zero gradient
        assert precision.step(optimizer)
        optimizer.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())
