"""Session 35: benchmarks/gemm.py times a chosen set of kernels (oneDNN's int8 reference fallback
took over 20 minutes on a CPU without AMX), and a recorded command quotes an argument with a
space as a shell reads it back."""

import shlex


def test_gemm_times_only_the_kernels_asked_for(as_script, tmp_path):
    done = as_script("gemm", "--kernels", "fp32,int8 (torch", "--rounds", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "| M x K -> N | fp32 (ms) | int8 (torch._int_mm) (ms) |" in done.stdout
    table = done.stdout[done.stdout.index("| M x K -> N") :]  # the lines above name the CPU's flags
    assert "bf16" not in table and "oneDNN" not in table
    command = done.stdout.split("Command: `")[1].split("`")[0]
    assert shlex.split(command)[3] == "fp32,int8 (torch"  # quoted: one argument


def test_gemm_refuses_kernels_that_name_none(as_script, tmp_path):
    done = as_script("gemm", "--kernels", "fp64", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr == "gemm.py: --kernels 'fp64' names no kernel; fix: e.g. fp32,bf16\n"
