#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (the CPU suite skips them): the tests in tests/gpu
# (native fp8 GEMMs against the emulation; every preset trained on the GPU against the same run on
# the CPU; resume; quantized inference; NCCL groups of one; compare's GPU memory), the step time of
# the fp8 recipes against fp32 and bf16-mixed on a model large enough for the GEMMs to matter, and
# a profile of an fp8-tensorwise step.
#
#   bash scripts/gpu_checks.sh            # logs in gpu-checks/ (or $OUT)
#   PYTHON=/path/to/python SIZE=medium bash scripts/gpu_checks.sh
#
# Runs the working tree with an existing CUDA PyTorch (PYTHONPATH), so that it needs no install.
# Each part has its own time limit (FP8_TEST_TIMEOUT, TEST_TIMEOUT, SPEED_TIMEOUT, PROFILE_TIMEOUT
# seconds; together under 10 minutes), so that one slow part leaves the others their logs;
# PROFILE=0 skips the profile. On an H200 the tests took 2.5 minutes (docs/gpu.md).
# LOWBIT_KERNELS=0: the CPU reference runs of the tests take the PyTorch path (the same bits as the
# fused kernels), so no C++ build is needed on the GPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-checks}
py=${PYTHON:-python3}
size=${SIZE:-llama-1b}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LOWBIT_KERNELS=0
status=0
{
    nvidia-smi -L
    $py -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(),
        "capability", torch.cuda.get_device_capability())'
} 2>&1 | tee "$out/device.log"
# The layer-level tests first, alone: they take seconds. Then the step times (the measurement no
# CPU can stand in for), then the training tests in WORKERS pytest-xdist processes sharing the
# GPU (-rA keeps each test's printed CPU and GPU losses), then the profile.
timeout "${FP8_TEST_TIMEOUT:-60}" $py -m pytest tests/gpu/test_native_fp8.py -v \
    -p no:cacheprovider 2>&1 |
    tee "$out/tests_fp8.log" || status=1
timeout "${SPEED_TIMEOUT:-200}" $py benchmarks/recipe_speed.py --device cuda --size "$size" \
    --recipes fp32,bf16-mixed,fp8-tensorwise,fp8-delayed,fp8-rowwise --rounds 5 --processes 1 \
    2>&1 | tee "$out/speed.log" || status=1
timeout "${TEST_TIMEOUT:-240}" $py -m pytest tests/gpu/test_training_on_cuda.py -v -rA \
    --tb=short --durations=20 -n "${WORKERS:-4}" -p no:cacheprovider 2>&1 |
    tee "$out/tests.log" || status=1
if [ "${PROFILE:-1}" != 0 ]; then
    timeout "${PROFILE_TIMEOUT:-90}" $py benchmarks/recipe_speed.py --device cuda --size "$size" \
        --profile fp8-tensorwise --profile-steps 3 2>&1 | tee "$out/profile.log" || status=1
fi
exit $status
