"""A precision that has taken one step: a small MLP converted by it, one SGD step under its
autocast, so that its `state_dict` holds what a run's would (tests of saving and loading it)."""

import torch

import lowbit


def one_step(recipe) -> lowbit.Precision:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    precision = lowbit.Precision(recipe)
    model = precision.convert(model)
    optimizer = precision.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    with precision.autocast():  # an input in the parameters' dtype: bf16-parameter recipes too
        loss = model(torch.randn(4, 32, dtype=precision.compute_dtype)).float().square().mean()
    precision.backward(loss)
    precision.step(optimizer)
    return precision
