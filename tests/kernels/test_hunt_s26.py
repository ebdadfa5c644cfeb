"""A compile that fails is remembered: later processes fall back at once, until something the
build depends on changes or the record is deleted."""

from pathlib import Path

import torch

from tests.kernels.test_hunt_s25 import failing_compiler, quantize_in_a_process


def counting_compiler(folder: Path, calls: Path) -> Path:
    """`failing_compiler` in ``folder``, adding an ``x`` line to ``calls`` at every compile."""
    folder.mkdir(exist_ok=True)
    compiler = failing_compiler(folder)
    compiler.write_text(compiler.read_text().replace("exit 1\n", f"echo x >> {calls}\nexit 1\n"))
    return compiler


def test_a_failed_compile_is_not_compiled_again_by_every_process(tmp_path):
    """Each process compiled again (about half a minute on a real compiler) before falling back
    to the same failure; every `lowbit` command and every rank of a run paid it. And the first
    process's note names the compile error, not the compile command (500 characters) as before
    (session 25). The record names what the build depends on: another compiler is tried, not
    skipped."""
    calls = tmp_path / "calls"
    env = {
        "CXX": str(counting_compiler(tmp_path, calls)),
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
    }

    values, expected, (loaded, first), _ = quantize_in_a_process(tmp_path, **env)
    assert torch.equal(values.view(torch.uint8), expected.view(torch.uint8))  # the PyTorch path
    compiles = calls.read_text().count("x")
    assert loaded == "False" and compiles >= 1
    assert first.startswith("RuntimeError: Error building extension 'lowbit_kernels_")
    assert first.endswith(
        ": quantize.cpp:3:1: error: expected unqualified-id before numeric constant"
    )
    assert "-DTORCH_EXTENSION_NAME" not in first

    values, expected, (loaded, again), err = quantize_in_a_process(tmp_path, **env)
    assert torch.equal(values.view(torch.uint8), expected.view(torch.uint8))  # the PyTorch path
    assert loaded == "False"
    assert calls.read_text().count("x") == compiles  # nothing compiled this time
    record = next((tmp_path / "ext").glob("lowbit_kernels_*/lowbit-build-failed.txt"))
    assert again == f"{first} (an earlier build; delete {record} to try again)"
    assert "Fix: mend the compiler" in err

    other_calls = tmp_path / "other-calls"
    other = counting_compiler(tmp_path / "other", other_calls)
    _, _, (loaded, error), _ = quantize_in_a_process(tmp_path, **{**env, "CXX": str(other)})
    assert loaded == "False" and "an earlier build" not in error
    assert other_calls.exists()  # another compiler: compiled, not skipped

    record.unlink()
    quantize_in_a_process(tmp_path, **env)
    assert calls.read_text().count("x") == 2 * compiles  # deleting the record tries again


def test_a_compiler_killed_for_memory_is_not_recorded(tmp_path):
    """A compile killed on a busy machine fails for the machine's state, not the sources: the
    record turned the kernels off for every later process until someone deleted it."""
    compiler = failing_compiler(tmp_path)
    compiler.write_text(
        compiler.read_text().replace(
            "quantize.cpp:3:1: error: expected unqualified-id before numeric constant",
            "c++: fatal error: Killed signal terminated program cc1plus",
        )
    )
    env = {"CXX": str(compiler), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    _, _, (loaded, error), _ = quantize_in_a_process(tmp_path, **env)
    assert loaded == "False" and "Killed signal" in error
    assert not list((tmp_path / "ext").glob("*/lowbit-build-failed.txt"))
