"""Session 29: ``lowbit quantize``/``prune --force`` over an earlier quantized or pruned folder
replaces exactly the files that folder lists in its quantization.json, as ``export --force`` does
with its lowbit_export.json (session 28), never a user's file that only has a name lowbit writes
elsewhere."""

import json
import shutil

import pytest

from lowbit.cli import main

# names lowbit writes into an export, or into another kind of run's folder, but which a quantized
# or pruned folder of the byte-level LM run never holds
USERS = ("config.json", "generation_config.json", "labels.json", "vocab.json")
USERS += ("model.safetensors.index.json",)

COMMANDS = {
    "quantize": ["--to", "int8"],
    "prune": ["--sparsity", "0.5"],
}


def _users_files(out, names=USERS):
    for name in names:
        (out / name).write_text(f"my own {name}\n")


def _assert_users_files_kept(out, names=USERS):
    for name in names:
        assert (out / name).read_text() == f"my own {name}\n", name


@pytest.mark.parametrize("command", COMMANDS)
def test_force_keeps_a_users_file_that_the_earlier_folder_did_not_write(
    lm_run, tmp_path, capsys, command
):
    """--force took every name in a fixed list (an export's config.json, generation_config.json
    and index, a classification run's labels.json, a word vocabulary) for the earlier folder's:
    a user's file of one of those names beside a quantized or pruned folder was moved away and
    deleted, though that folder never wrote it."""
    out = tmp_path / "out"
    make = [command, str(lm_run), *COMMANDS[command], "--out", str(out)]
    assert main(make) == 0
    files = json.loads((out / "quantization.json").read_text())["files"]
    assert files == sorted(p.name for p in out.iterdir()), files
    _users_files(out)
    weights = (out / "model.safetensors").stat().st_mtime_ns
    assert main([*make, "--force"]) == 0
    _assert_users_files_kept(out)
    assert (out / "model.safetensors").stat().st_mtime_ns != weights  # written again
    capsys.readouterr()


def test_force_over_a_folder_without_a_file_list_replaces_only_what_such_folders_write(
    lm_run, tmp_path, capsys
):
    """A quantized folder written before quantization.json listed its files: --force replaces
    the names a quantized or pruned folder writes (model.safetensors, config.yaml, labels.json
    ...), not an export's config.json beside it."""
    exports = ("config.json", "generation_config.json", "model.safetensors.index.json")
    out = tmp_path / "q"
    make = ["quantize", str(lm_run), "--to", "int4", "--out", str(out)]
    assert main(make) == 0
    manifest = json.loads((out / "quantization.json").read_text())
    del manifest["files"]
    (out / "quantization.json").write_text(json.dumps(manifest))
    _users_files(out, exports)
    assert main(["prune", str(lm_run), "--pattern", "2:4", "--out", str(out), "--force"]) == 0
    _assert_users_files_kept(out, exports)
    manifest = json.loads((out / "quantization.json").read_text())
    assert manifest["pruning"]["rule"] == "2:4" and manifest["quantization"] is None
    capsys.readouterr()


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize(
    "command",
    [
        ["quantize", "--to", "int8", "--out", "tokenizer"],
        ["prune", "--sparsity", "0.5", "--out", "checkpoints"],
        ["export", "--out", "checkpoints/hf"],
    ],
)
def test_an_out_inside_the_source_folder_is_one_line(lm_run, tmp_path, capsys, command):
    """An --out inside the folder read: quantize into the run's tokenizer/ with --force copied
    that folder into its own copy until the path was too long (a traceback), and prune or export
    into its checkpoints/ wrote a model folder in among the run's checkpoints."""
    from tests.infer.test_hunt_s24 import one_line_error

    run = tmp_path / "run"
    shutil.copytree(lm_run, run)
    before = _tree(run)
    name, *flags = command
    flags[-1] = str(run / flags[-1])
    capsys.readouterr()
    assert main([name, str(run), *flags, "--force"]) == 2
    folder = flags[-1].removeprefix(f"{run}/").split("/")[0]
    one_line_error(capsys, f"inside the source folder's {folder}; fix: choose a folder outside it")
    assert _tree(run) == before


def test_an_out_elsewhere_inside_the_run_is_a_place_to_keep_it(lm_run, tmp_path):
    """``RUN/int8``: beside the run's own folders, nothing the step reads."""
    run = tmp_path / "run"
    shutil.copytree(lm_run, run)
    assert main(["quantize", str(run), "--to", "int8", "--out", str(run / "int8")]) == 0
    assert (run / "int8" / "quantization.json").is_file()


def _edited(manifest, edit):
    if edit == "a list":
        return [manifest]
    if edit == "no layers":
        del manifest["layers"]
    elif edit == "no source":
        del manifest["source"]
    elif edit == "step in words":
        manifest["source"]["step"] = "twelve"
    elif edit == "unknown format":
        manifest["quantization"]["format"] = "int3"
    return manifest


@pytest.mark.parametrize(
    "edit, problem",
    [
        ("a list", "not a JSON object"),
        ("no layers", "no list of the layers it changed"),
        ("no source", "no source path"),
        ("step in words", "no source step"),
        ("unknown format", "a quantization it cannot read ('int3' is not a valid Target)"),
    ],
)
def test_a_quantization_json_edited_into_other_json_is_one_line(
    lm_run, tmp_path, capsys, edit, problem
):
    """A quantization.json that is valid JSON but not what lowbit wrote (a list, an entry
    deleted or retyped by hand) was a traceback (AttributeError, KeyError, ValueError) in
    eval, generate, quantize and export alike; now each names the file and the problem."""
    from tests.infer.test_hunt_s24 import one_line_error

    out = tmp_path / "q"
    assert main(["quantize", str(lm_run), "--to", "int4", "--out", str(out)]) == 0
    manifest = json.loads((out / "quantization.json").read_text())
    (out / "quantization.json").write_text(json.dumps(_edited(manifest, edit)))
    for command in (["eval", str(out)], ["export", str(out), "--out", str(tmp_path / "hf")]):
        capsys.readouterr()
        assert main(command) == 2
        one_line_error(capsys, f"{out}/quantization.json: {problem}")
    assert not (tmp_path / "hf").exists()


def test_a_quoted_tilde_is_the_home_folder(lm_run, tmp_path, monkeypatch, capsys):
    """``--out=~/q`` (the shell expands no ~ after ``=``) or a quoted ``'~/run'`` from a script:
    quantize, prune and export wrote a folder named ``~`` in the current folder, or said "no such
    folder" of the run, and generate did not find the folder, where ``lowbit eval`` and ``lowbit
    train`` read ``~`` as the home folder."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    (home / "run").symlink_to(lm_run)
    (home / "prompt.txt").write_text("def ")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert main(["quantize", "~/run", "--to", "int8", "--out=~/q"]) == 0
    assert main(["prune", "~/run", "--sparsity", "0.5", "--out", "~/p", "--max-batches", "1"]) == 0
    assert main(["export", "~/q", "--out=~/hf"]) == 0
    capsys.readouterr()
    generate = ["generate", "~/q", "--prompt-file", "~/prompt.txt", "--max-new-tokens", "2"]
    assert main(generate) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert (home / "q" / "quantization.json").is_file() and (
        home / "p" / "model.safetensors"
    ).is_file()
    assert (home / "hf" / "config.json").is_file()
    assert list(cwd.iterdir()) == []
