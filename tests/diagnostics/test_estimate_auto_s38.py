"""`lowbit estimate RUN` of an ``auto`` run estimates the plan the run trains in (its
metrics.jsonl's latest), not the bf16 plan it starts from; and a run summary says "no loss
scaling" for a recipe without one, where it printed "loss scale 1"."""

import json
import shutil

from lowbit.cli import main
from lowbit.train import train
from lowbit.train.config import TrainConfig, resolve, write

NANO_LAYERS = [
    f"model.layers.{i}.{name}"
    for i in range(3)
    for name in (
        *(f"self_attn.{p}_proj" for p in "qkvo"),
        *(f"mlp.{p}_proj" for p in ("gate", "up", "down")),
    )
]
OPERANDS = [
    "forward.x", "forward.w", "grad_input.grad_out", "grad_input.w", "grad_weight.grad_out",
    "grad_weight.x",
]  # fmt: skip


def _estimate_json(capsys, *argv) -> dict:
    assert main(["estimate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _row(table: str, component: str) -> tuple[int, int]:
    """(estimated, measured) bytes of ``component`` in a run's memory table."""
    line = next(line for line in table.splitlines() if line.startswith(component))
    cells = line[len(component) :].split()
    return int(cells[0].replace(",", "")), int(cells[-3].replace(",", ""))


def test_an_auto_run_is_estimated_at_the_plan_it_trained_in(lm_config, capsys):
    """Estimated at its bf16 start, nano's auto:fp4 run had 333,952 bytes of temporary copies
    (bf16 weight copies) where it measured 32,896 (the kept head's alone): its plan holds no
    16-bit weight copy. The run's own memory table compared the same start with the plan."""
    config = lm_config(model="nano", recipe="auto:fp4", steps=2)
    result = train(config, quiet=True)
    table = result.extra["memory_table"]
    capsys.readouterr()
    out = _estimate_json(capsys, "--model", str(result.run_dir))
    start = _estimate_json(
        capsys, "--model", "nano", "--recipe", "auto:fp4", "--batch", "4", "--seq", "32"
    )
    estimated, measured = _row(table, "temporary copies")
    assert out["temporaries"] == estimated == measured < start["temporaries"]
    # the activations: the CPU keeps the fp8 rung's reused inputs in bf16 carriers (docs)
    estimated, measured = _row(table, "activations")
    assert out["activations"] == estimated and 0.9 < estimated / measured <= 1
    counts = result.extra["auto_plan"].split(" operands")[0]  # "97 fp4, 13 fp6, 16 fp8 of 126"
    assert out["notes"] == [f"estimated at the auto plan of step 1: {counts} operands"]
    assert "  precision        no loss scaling" in result.summary().splitlines()


def _auto_run(folder, plans: dict[int, str]) -> None:
    """A nano ``auto`` run folder whose metrics.jsonl logged, at each step of ``plans``, every
    operand of every layer on that rung."""
    config = TrainConfig(model="nano", recipe="auto", out=str(folder), seq_len=64, batch_size=1)
    write(resolve(config), folder)
    lines = [json.dumps({"step": 1, "split": "train", "loss": 5.0})]
    for step, rung in plans.items():
        record = {f"{layer}/{op}": rung for layer in NANO_LAYERS for op in OPERANDS}
        lines.append(json.dumps({"step": step, "split": "plan", **record}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_the_latest_plan_is_estimated_and_a_run_without_one_at_its_start(tmp_path, capsys):
    components = ("activations", "temporaries", "total")
    start = _estimate_json(capsys, "--model", "nano", "--recipe", "auto", "--seq", "64")
    fp8 = _estimate_json(capsys, "--model", "nano", "--recipe", "fp8-tensorwise", "--seq", "64")
    assert start["temporaries"] != fp8["temporaries"]
    _auto_run(tmp_path, {})  # stopped before its first check: the plan it starts from
    out = _estimate_json(capsys, "--model", str(tmp_path))
    assert [out[c] for c in components] == [start[c] for c in components]
    assert out["notes"] == start["notes"] and "plan it starts from" in out["notes"][0]
    # every operand on auto's fp8 rung: fp8-tensorwise, to the byte
    _auto_run(tmp_path, {1: "fp8"})
    out = _estimate_json(capsys, "--model", str(tmp_path))
    assert [out[c] for c in components] == [fp8[c] for c in components]
    assert out["notes"] == ["estimated at the auto plan of step 1: 126 fp8 of 126 operands"]
    _auto_run(tmp_path, {1: "fp8", 50: "bf16"})  # moved back up at step 50: the latest counts
    out = _estimate_json(capsys, "--model", str(tmp_path))
    assert [out[c] for c in components] == [start[c] for c in components]
    assert out["notes"] == ["estimated at the auto plan of step 50: 126 bf16 of 126 operands"]
    # another recipe, or another budget, is not the run's plan
    out = _estimate_json(capsys, "--model", str(tmp_path), "--recipe", "auto:fp4")
    assert "plan it starts from" in out["notes"][0]


def test_an_override_given_wins_over_the_runs_plan(tmp_path, capsys):
    """The plan's operands are those the run's overrides left open; an --override given replaces
    the run's list and wins over the plan where both decide a layer."""
    _auto_run(tmp_path, {1: "fp8"})
    argv = ["--override", "model.layers.0.*=keep", "--seq", "64", "--json"]
    assert main(["estimate", "--model", str(tmp_path), *argv]) == 0
    out = json.loads(capsys.readouterr().out)
    assert main(["estimate", "--model", "nano", "--recipe", "fp8-tensorwise", *argv]) == 0
    fp8 = json.loads(capsys.readouterr().out)
    components = ("activations", "temporaries", "total")
    assert [out[c] for c in components] == [fp8[c] for c in components]


def test_a_recipe_with_loss_scaling_still_prints_its_scale(lm_config, tmp_path):
    config = lm_config(model="nano", recipe="fp16-mixed", steps=1, out=str(tmp_path / "a"))
    result = train(config, quiet=True)
    assert "  precision        skipped steps 0, loss scale 65536" in result.summary().splitlines()
    config = lm_config(model="nano", recipe="bf16-mixed", steps=1, out=str(tmp_path / "b"))
    result = train(config, quiet=True)
    assert "  precision        no loss scaling" in result.summary().splitlines()


def test_a_plan_of_layers_the_model_lacks_is_said_so(tmp_path, capsys):
    """A plan whose layer names match no layer of the model (or some of them) left those layers
    at the bf16 start while the note said "estimated at the auto plan": now the note names them."""
    components = ("activations", "temporaries", "total")
    start = _estimate_json(capsys, "--model", "nano", "--recipe", "auto", "--seq", "64")
    fp8 = _estimate_json(capsys, "--model", "nano", "--recipe", "fp8-tensorwise", "--seq", "64")
    _auto_run(tmp_path, {1: "fp8"})
    metrics = tmp_path / "metrics.jsonl"
    text = metrics.read_text()
    metrics.write_text(text.replace('"model.layers.', '"encoder.layers.'))  # none matches
    out = _estimate_json(capsys, "--model", str(tmp_path))
    assert [out[c] for c in components] == [start[c] for c in components]
    assert out["notes"] == [
        "the auto plan of step 1: 126 fp8 of 126 operands names no layer of this model "
        "(encoder.layers.0.self_attn.q_proj, encoder.layers.0.self_attn.k_proj, "
        "encoder.layers.0.self_attn.v_proj (+18 more)): estimated at the plan it starts from, "
        "every converted layer in bf16"
    ]
    metrics.write_text(text.replace('"model.layers.0.', '"model.layers.9.'))  # block 0's don't
    out = _estimate_json(capsys, "--model", str(tmp_path))
    assert fp8["temporaries"] < out["temporaries"] < start["temporaries"]
    assert out["notes"] == [
        "estimated at the auto plan of step 1: 126 fp8 of 126 operands; 7 of its layers match "
        "no layer of this model (model.layers.9.self_attn.q_proj, model.layers.9.self_attn.k_proj, "
        "model.layers.9.self_attn.v_proj (+4 more)): those at the start, in bf16"
    ]


def test_a_folder_quantized_or_pruned_from_an_auto_run_is_estimated_at_its_plan(
    lm_config, tmp_path, capsys
):
    """Such a folder holds the run's config.yaml, so its estimate is the run's training; it has
    no metrics.jsonl, and was estimated at the bf16 start: now at its source run's plan."""
    config = lm_config(model="nano", recipe="auto:fp4", steps=2)
    result = train(config, quiet=True)
    run = str(result.run_dir)
    pruned, quantized = str(tmp_path / "pruned"), str(tmp_path / "q")
    assert main(["prune", run, "--sparsity", "0.5", "--out", pruned]) == 0
    assert main(["quantize", pruned, "--to", "int8", "--out", quantized]) == 0
    capsys.readouterr()
    expected = _estimate_json(capsys, "--model", run)
    assert expected["notes"][0].startswith("estimated at the auto plan of step 1: ")
    for folder in (pruned, quantized):
        assert _estimate_json(capsys, "--model", folder) == expected | {
            "settings": expected["settings"] | {"model": folder}
        }
    shutil.rmtree(run)  # its run deleted: no plan to read, the start (as before)
    assert "plan it starts from" in _estimate_json(capsys, "--model", quantized)["notes"][0]
