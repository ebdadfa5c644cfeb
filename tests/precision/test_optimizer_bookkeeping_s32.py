"""`Precision`'s bookkeeping of optimizers rebuilt mid-run (session 32): after
``resize_token_embeddings``, or to change param groups when unfreezing layers, the new optimizer
supersedes the old one in `state_dict`, and a run resumed with the new optimizer alone continues."""

import copy
import gc
import warnings
import weakref

import pytest
import torch

from lowbit import Precision
from lowbit.errors import UsageError
from tests.precision.test_hunt_s25 import step
from tests.precision.test_precision import mlp

transformers = pytest.importorskip("transformers")


def llama(vocab):
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def lm_step(precision, model, optimizer, vocab, seed):
    tokens = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(seed))
    with precision.autocast():
        loss = model(tokens, labels=tokens).loss
    precision.backward(loss)
    precision.step(optimizer)
    optimizer.zero_grad()


@pytest.mark.parametrize("recipe", ["fp16-low", "bf16-pure-kahan"])
def test_a_run_resized_and_given_a_new_optimizer_saves_and_resumes(recipe):
    """After ``resize_token_embeddings``, ``convert`` again and a new optimizer, `state_dict` held
    the old optimizer's share too (``params_per_optimizer`` [12, 12]), and a resumed run with the
    new optimizer alone was refused: "the saved master weight of parameter 11 has shape (64, 32),
    the parameter (80, 32)"."""
    torch.manual_seed(0)
    precision = Precision(recipe)
    model = precision.convert(llama(64))
    first = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    lm_step(precision, model, first, 64, 1)
    old_head = weakref.ref(model.lm_head.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes on resizing
        model.resize_token_embeddings(80, mean_resizing=False)
    precision.convert(model)
    optimizer = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    lm_step(precision, model, optimizer, 80, 2)
    del first
    gc.collect()
    assert old_head() is None  # its master weight (Kahan buffer) no longer keeps it alive
    saved = copy.deepcopy((precision.state_dict(), model.state_dict(), optimizer.state_dict()))

    resumed = Precision(recipe)
    again = resumed.convert(llama(80))
    again.load_state_dict(saved[1])
    resumed_optimizer = resumed.wrap_optimizer(torch.optim.AdamW(again.parameters(), lr=1e-2))
    resumed.load_state_dict(saved[0])
    resumed_optimizer.load_state_dict(saved[2])
    for seed in (3, 4):
        lm_step(precision, model, optimizer, 80, seed)
        lm_step(resumed, again, resumed_optimizer, 80, seed)
    assert all(map(torch.equal, model.parameters(), again.parameters()))
    assert saved[0]["params_per_optimizer"] == [len(list(model.parameters()))]


@pytest.mark.parametrize("recipe", ["bf16-low", "bf16-pure-kahan"])
def test_an_optimizer_rebuilt_to_unfreeze_layers_supersedes_the_old_one(recipe):
    """Fine-tuning that trains the head first, then rebuilds the optimizer over the whole model
    with its own param groups, saved both optimizers' shares, the head's masters (Kahan buffers)
    in the new one's; resumed with the new optimizer alone, which took the first share, the run
    silently lost them and continued otherwise than the uninterrupted one."""
    precision = Precision(recipe)
    model = precision.convert(mlp())
    head = precision.wrap_optimizer(torch.optim.AdamW(model[-1].parameters(), lr=1e-2))
    step(precision, model, head, 0)

    def whole(model):
        body = [p for layer in list(model)[:-1] for p in layer.parameters()]
        groups = [{"params": body, "lr": 1e-3}, {"params": list(model[-1].parameters())}]
        return torch.optim.AdamW(groups, lr=1e-2)

    optimizer = precision.wrap_optimizer(whole(model))
    step(precision, model, optimizer, 1)
    saved = copy.deepcopy((precision.state_dict(), model.state_dict(), optimizer.state_dict()))

    resumed = Precision(recipe)
    again = resumed.convert(mlp())
    again.load_state_dict(saved[1])
    resumed_optimizer = resumed.wrap_optimizer(whole(again))
    resumed.load_state_dict(saved[0])
    resumed_optimizer.load_state_dict(saved[2])
    for seed in (2, 3):
        step(precision, model, optimizer, seed)
        step(resumed, again, resumed_optimizer, seed)
    assert all(map(torch.equal, model.parameters(), again.parameters()))
    assert saved[0]["params_per_optimizer"] == [len(list(model.parameters()))]


def test_a_superseded_optimizer_stepped_again_is_refused_in_one_line():
    """Its parameters' master weights belong to the newer optimizer; stepping both would move
    them twice a step, and `state_dict` could not say whose they are."""
    precision = Precision("bf16-low")
    model = precision.convert(mlp())
    old = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    step(precision, model, old, 0)
    new = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=1e-2))
    step(precision, model, new, 1)
    with pytest.raises(UsageError, match=r"superseded.*fix: step only the newer optimizer"):
        step(precision, model, old, 2)


@pytest.mark.parametrize("recipe", ["fp16-low", "bf16-mixed"])
def test_an_optimizer_over_part_of_the_model_leaves_the_main_one_be(recipe):
    """A head-only optimizer (a probe, a head warm-up) beside the main one shares the head's
    parameters but not the rest, which the model still holds: both stay, and the main one goes
    on stepping with its master weights (the supersession refused it, and dropped them)."""
    torch.manual_seed(0)
    precision = Precision(recipe)
    model = precision.convert(
        torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    )
    main = precision.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))

    def step(optimizer):
        with precision.autocast():
            loss = model(torch.randn(8, 16)).float().pow(2).mean()
        precision.backward(loss)
        precision.step(optimizer)
        optimizer.zero_grad()

    step(main)
    probe = precision.wrap_optimizer(torch.optim.SGD(model[2].parameters(), lr=1e-2))
    step(probe)
    step(main)
    assert precision.state_dict()["params_per_optimizer"] == [4, 2]
