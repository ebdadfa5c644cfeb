"""A compile that fails is remembered: later processes fall back at once, until something the
build depends on changes or the record is deleted."""

import torch

from tests.kernels.test_hunt_s25 import failing_compiler, quantize_in_a_process


def test_a_failed_compile_is_not_compiled_again_by_every_process(tmp_path):
    """Each process compiled again (about half a minute on a real compiler) before falling back
    to the same failure; every `lowbit` command and every rank of a run paid it."""
    compiler = failing_compiler(tmp_path)
    calls = tmp_path / "calls"
    compiler.write_text(compiler.read_text().replace("exit 1\n", f"echo x >> {calls}\nexit 1\n"))
    env = {"CXX": str(compiler), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}

    values, expected, (loaded, first), _ = quantize_in_a_process(tmp_path, **env)
    compiles = calls.read_text().count("x")
    assert loaded == "False" and compiles >= 1
    assert first.endswith("error: expected unqualified-id before numeric constant")

    values, expected, (loaded, again), err = quantize_in_a_process(tmp_path, **env)
    assert torch.equal(values.view(torch.uint8), expected.view(torch.uint8))  # the PyTorch path
    assert loaded == "False"
    assert calls.read_text().count("x") == compiles  # nothing compiled this time
    record = next((tmp_path / "ext").glob("lowbit_kernels_*/lowbit-build-failed.txt"))
    assert again == f"{first} (an earlier build; delete {record} to try again)"
    assert "Fix: mend the compiler" in err

    record.unlink()
    quantize_in_a_process(tmp_path, **env)
    assert calls.read_text().count("x") == 2 * compiles  # deleting the record tries again


def test_another_compiler_builds_again(tmp_path):
    """The record names what the build depends on: a changed compiler is tried, not skipped."""
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    quantize_in_a_process(tmp_path, CXX=str(failing_compiler(tmp_path)), **env)
    other = tmp_path / "other"
    other.mkdir()
    compiler = failing_compiler(other)
    calls = tmp_path / "calls"
    compiler.write_text(compiler.read_text().replace("exit 1\n", f"echo x >> {calls}\nexit 1\n"))
    _, _, (loaded, error), _ = quantize_in_a_process(tmp_path, CXX=str(compiler), **env)
    assert loaded == "False" and "an earlier build" not in error
    assert calls.exists()


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
