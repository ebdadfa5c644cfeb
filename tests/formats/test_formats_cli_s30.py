"""`lowbit formats --tensor` on run folders, on names that collide, and its SQNR's cost."""

import torch
from safetensors.torch import save_file

from lowbit.cli import main
from lowbit.commands import formats as command


def rows(out: str) -> list[str]:
    """The tensor names of the SQNR table (its title and header are the first two lines)."""
    return [line.split()[0] for line in out.splitlines()[2:] if not line.startswith("note:")]


def test_a_run_folder_is_measured_through_its_latest_checkpoint(tmp_path, capsys):
    """A run folder, which every other command takes, was refused with "pass a .pt or
    .safetensors file (a lowbit run's are in its checkpoints folder)"."""
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("recipe: fp32\n")
    for step in (5, 10):
        state = {"step": step, "model": {f"w{step}": torch.randn(4, 32)}}
        torch.save(state, folder / f"step-{step:07d}.pt")
    assert main(["formats", "--tensor", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    assert rows(captured.out) == ["w10"]
    latest = folder / "step-0000010.pt"
    assert captured.err == (
        f"lowbit formats: note: measuring {tmp_path / 'run'}'s latest checkpoint, {latest}\n"
    )


def test_a_folder_of_dcp_checkpoints_names_its_last_one_as_the_fix(tmp_path, capsys):
    """A multi-process run's checkpoints folder holds .dcp folders, no .pt file; the fix said to
    pass a .pt file "(a lowbit run's are in its checkpoints folder)": the folder passed."""
    for step in (5, 10):
        (tmp_path / f"step-{step:07d}.dcp").mkdir()
    assert main(["formats", "--tensor", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"lowbit: error: {tmp_path}: a folder, with no .safetensors or pytorch_model.bin file in "
        "it; fix: pass one of "
        f"its .dcp checkpoints (the last: {tmp_path / 'step-0000010.dcp'})\n"
    )


def test_tensors_whose_names_collide_each_get_a_row(tmp_path, capsys):
    """A flat "a.b" and a nested a -> b (or keys 0 and "0") shared the name "a.b", and the first
    tensor vanished from the table without a word; so did a name repeated across two shards."""
    nested = {"a.b": torch.randn(4, 8), "a": {"b": torch.randn(4, 8)}, 0: torch.randn(2, 8)}
    nested["0"] = torch.randn(2, 8)
    torch.save(nested, tmp_path / "nested.pt")
    assert main(["formats", "--tensor", str(tmp_path / "nested.pt")]) == 0
    assert rows(capsys.readouterr().out) == ["a.b", "a.b#2", "0", "0#2"]

    shards = tmp_path / "shards"
    shards.mkdir()
    save_file({"w": torch.randn(4, 8)}, str(shards / "model-1.safetensors"))
    save_file({"w": torch.randn(4, 8)}, str(shards / "model-2.safetensors"))
    assert main(["formats", "--tensor", str(shards)]) == 0
    assert rows(capsys.readouterr().out) == ["w", "w#2"]


def test_the_sqnr_is_measured_on_the_tensor_itself_not_a_masked_copy(monkeypatch):
    """Picking the finite entries out with a boolean mask, for every one of 13 schemes, took
    about ten times as long as the quantizations themselves (40 s for one 4096 x 4096 tensor);
    the zeroed non-finite entries add nothing to either sum, so no copy is needed."""
    seen = []
    measure = command.sqnr

    def spy(reference, approximation):
        seen.append(reference)
        return measure(reference, approximation)

    monkeypatch.setattr(command, "sqnr", spy)
    tensor = torch.randn(8, 64)
    command.error_table({"w": tensor})
    assert len(seen) == len(command.SCHEMES)
    assert all(reference is tensor for reference in seen)


def test_non_finite_entries_still_count_for_nothing_in_the_sqnr():
    """The SQNR over the whole tensor, its inf and NaN entries set to 0, is that of its finite
    entries alone, for every scheme and float dtype."""
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        clean = torch.randn(8, 96, generator=generator).to(dtype)
        dirty = clean.clone()
        dirty[0, 3], dirty[2, 40], dirty[6, :32] = float("inf"), float("nan"), float("-inf")
        finite = dirty.isfinite()
        table = command.error_table({"w": dirty}).splitlines()[2].split()[1:]
        expected = []
        for fmt, granularity, block in command.SCHEMES:
            x = dirty.float().where(finite, 0)
            if granularity is None:
                approximation = command.cast(x, fmt)
            else:
                approximation = command.quantize(x, fmt, granularity, block_size=block)
                approximation = approximation.dequantize()
            expected.append(f"{command.sqnr(x[finite], approximation[finite]):.2f}")
        assert table == expected, dtype


def test_a_pickled_module_is_refused_with_the_state_dict_as_the_fix(tmp_path, capsys):
    """`torch.save(model)` was refused with torch's page of text, whose fix is to trust the class
    (which runs its code), and "fix: pass a .pt file saved with torch.save": what the user did."""
    torch.save(torch.nn.Linear(4, 4), tmp_path / "model.pt")
    assert main(["formats", "--tensor", str(tmp_path / "model.pt")]) == 2
    assert capsys.readouterr().err == (
        f"lowbit: error: {tmp_path / 'model.pt'}: it holds a pickled "
        "torch.nn.modules.linear.Linear object, which a safe load does not rebuild (unpickling it "
        "could run any code); fix: save its tensors alone, torch.save(model.state_dict(), path), "
        "and pass that\n"
    )


def test_float64_entries_that_round_to_zero_in_fp32_are_noted(tmp_path, capsys):
    """A float64 tensor of values below fp32's range read "inf" (exact) in every format, bf16's
    too, without a word: they are 0 in fp32, through which every format quantizes."""
    tiny = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.save({"tiny": tiny * 1e-50, "fine": tiny}, tmp_path / "t.pt")
    assert main(["formats", "--tensor", str(tmp_path / "t.pt")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[4:] == [
        "note: tiny: 32 of 32 entries round to 0 in fp32 (|x| <= 7.006e-46), through which every "
        "format quantizes, and count as 0 in its SQNR; fix: scale the tensor into fp32's range "
        "(e.g. divide it by its largest |x|)"
    ]
