"""A built-in preset changed in place (``dataclasses.replace``) keeps the preset's name: a state
saved by it loaded into the preset, or the other way round, without a word, and the run went on
in other numerics (the changed bf16-mixed's master weights dropped by the preset's fp32 ones)."""

import warnings
from dataclasses import replace

import pytest

from lowbit.errors import UsageError
from lowbit.recipes import get_recipe
from lowbit.train import TrainConfig, train
from lowbit.train import checkpoint as ckpt
from lowbit.train import trainer as trainer_module
from tests.precision.one_step import one_step
from tests.train.test_resume_matrix_s31 import differences, records

CHANGES = {
    "bf16 params, fp32 masters": replace(
        get_recipe("bf16-mixed"), autocast=None, param_dtype="bf16", master_dtype="fp32"
    ),
    "static loss scaling": replace(get_recipe("fp16-mixed"), loss_scaling="static"),
    "fp8 layers": replace(get_recipe("bf16-mixed"), layer=get_recipe("fp8-tensorwise").layer),
}


@pytest.mark.parametrize("changed", CHANGES.values(), ids=list(CHANGES))
def test_a_state_of_a_changed_preset_and_the_presets_refuse_each_other(changed):
    preset = get_recipe(changed.name)
    saved_changed, saved_preset = one_step(changed).state_dict(), one_step(preset).state_dict()
    fix = rf"fix: .*dataclasses.replace\(recipe, name='{changed.name}-custom'\)"
    with pytest.raises(UsageError, match=rf"saved under {changed.name} changed in .*{fix}"):
        one_step(preset).load_state_dict(saved_changed)
    with pytest.raises(UsageError, match=rf"saved under the preset {changed.name}, .*{fix}"):
        one_step(changed).load_state_dict(saved_preset)
    with warnings.catch_warnings():  # each into its own: silently
        warnings.simplefilter("error")
        one_step(replace(changed)).load_state_dict(saved_changed)
        one_step(preset).load_state_dict(saved_preset)


def test_the_fix_a_name_of_its_own_loads_as_a_warned_switch():
    changed = CHANGES["bf16 params, fp32 masters"]
    state = one_step(get_recipe("bf16-mixed")).state_dict()
    with pytest.warns(UserWarning, match="saved under recipe bf16-mixed, this Precision's is mine"):
        one_step(replace(changed, name="mine")).load_state_dict(state)


def test_other_overrides_and_loss_scale_options_leave_a_preset_loadable():
    """As ``lowbit train --override``, ``--loss-scale`` and ``--loss-scale-growth-interval``
    change a preset: the state's loss scale replaces the start, and layers in other formats are
    warned of one by one."""
    fp16 = get_recipe("fp16-mixed")
    changed = replace(
        fp16.with_overrides("0=keep"), initial_loss_scale=1024.0, loss_scale_growth_interval=5
    )
    state = one_step(changed).state_dict()
    one_step(fp16).load_state_dict(state)
    with pytest.warns(UserWarning, match=r"layer 2 \(saved: fwd fp16 .* now: fwd fp32"):
        one_step(changed.with_overrides("2=fp32")).load_state_dict(state)


def test_a_run_with_overrides_and_loss_scaling_options_resumes_silently_and_identically(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(trainer_module.Trainer, "sample", False)  # no closing samples (slow)
    settings = dict(
        model="nano",
        seq_len=8,
        batch_size=2,
        eval_batches=1,
        steps=2,
        recipe="fp16-mixed",
        overrides=["model.layers.0.*=keep"],
        loss_scale=1024.0,
        loss_scale_growth_interval=1,  # the scale grows at each step, the resumed one's too
    )
    train(TrainConfig(**settings, out=str(tmp_path / "a")), quiet=True)

    def stop_after_the_first_step(trainer):
        trainer.stop_requested = True  # a Ctrl-C's

    config = TrainConfig(**settings, out=str(tmp_path / "b"))
    assert train(config, quiet=True, on_step=stop_after_the_first_step).status == "interrupted"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert train(config, resume=True, quiet=True).status == "completed"
    assert records(tmp_path / "b") == records(tmp_path / "a")
    final = [ckpt.load(ckpt.latest(tmp_path / run)) for run in "ab"]
    assert differences(*final) == []
