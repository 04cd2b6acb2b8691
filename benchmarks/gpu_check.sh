#!/usr/bin/env bash
# Everything issue 6 asks of a GPU, in one go (about 8 minutes on one H100): the tests that
# only run there (cuDNN attention, bfloat16), then benchmarks/accelerator.py in float32 and
# bfloat16, then bfloat16 again with --scan-layers and with --remat. Target: GPT-2 small's
# shape in bfloat16 at MFU >= 0.50 (accelerator.py's MFU_TARGET; its last line says whether
# it is met). Logs go to $OUT (the device tool's folder) or ./gpu-check; record the card,
# the figures and this command in benchmarks/RESULTS.md.
#
#     bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#     bash benchmarks/gpu_check.sh --small    # a dry run of the same steps on a CPU
#
# Extra arguments go to every accelerator.py run. Needs JAX with its CUDA plugin, flax, optax,
# orbax-checkpoint, safetensors, tokenizers and pytest; the repository need not be installed.
set -u -o pipefail
out=${OUT:-gpu-check}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python=$(command -v python3 || command -v python)

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null \
        || echo "no nvidia-smi"
    "$python" -c "import jax; print('jax', jax.__version__, jax.devices())"
} 2>&1 | tee "$out/device.txt"

timeout 180 "$python" -m pytest -q -p no:cacheprovider tests/test_attention.py \
    tests/test_precision.py 2>&1 | tee "$out/tests.log"

for flags in "" "--dtypes bfloat16 --scan-layers" "--dtypes bfloat16 --remat"; do
    echo "=== accelerator.py $flags $*" | tee -a "$out/accelerator.log"
    # shellcheck disable=SC2086  # $flags is a list of flags
    timeout 300 "$python" benchmarks/accelerator.py $flags "$@" 2>&1 \
        | tee -a "$out/accelerator.log"
done
