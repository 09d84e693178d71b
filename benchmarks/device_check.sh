#!/usr/bin/env bash
# One command for the first accelerator a session gets (issue 17):
#
#   benchmarks/device_check.sh [--tiny] [--out FILE]
#
# 1. every kernel test compiled for the device (kernel_cases.INTERPRET is False off CPU;
#    the @slow grids included; the TPU-interpret and Mosaic-lowering tests are left to CPU CI
#    on a GPU), and the lowering tests (Triton IR -> PTX through the CUDA plugin);
# 2. benchmarks/kernels.py: FlashAttention vs cuDNN and plain jnp at 4k-16k, paged and
#    ragged paged attention as a fraction of HBM bandwidth, sparse and int8 matmul vs
#    dense bf16, batch-1 decode of a 1B-class random Llama vs the HBM roofline;
# 3. the KV pool `energon info` gives the demo model (sized from device memory off CPU);
# 4. one Markdown table with the target beside each figure, printed and written to FILE
#    (default benchmarks/device_check.md) for benchmarks/RESULTS.md.
#
# --tiny: a few tests and every benchmark case at tiny sizes, seconds on a CPU; the default
# test run calls it (tests/test_device_check.py) so the script cannot rot before a GPU comes.
# Exit status: 0 when every test passed and no benchmark row failed (targets missed are
# reported in the table, not in the status).
set -euo pipefail

tiny=0
out=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --tiny) tiny=1; shift ;;
        --out) out="${2:?--out needs a file}"; shift 2 ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "device_check.sh: unknown argument '$1' (known: --tiny, --out FILE)" >&2; exit 2 ;;
    esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${out:-benchmarks/device_check.md}"
python="${PYTHON:-python}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

kernel_tests=(tests/test_kernel_lowering.py tests/test_flash_attention.py tests/test_paged_attention.py
              tests/test_ragged_paged_attention.py tests/test_int8_matmul.py tests/test_sparse_matmul.py)
if [[ $tiny -eq 1 ]]; then
    pytest_args=(tests/test_ragged_paged_attention.py -k "name_the_mosaic_rule or bad_options")
    bench_args=(--tiny --reps 2)
else
    pytest_args=("${kernel_tests[@]}" -m "slow or not slow" -k "not tpu")
    bench_args=()
fi

# 1. kernel tests, compiled for the device
status=0
start=$SECONDS
if "$python" -m pytest -q -p no:cacheprovider "${pytest_args[@]}" >"$work/pytest.log" 2>&1; then
    tests_ok=yes
else
    tests_ok=no
    status=1
fi
summary="$(grep -E '(passed|failed|error)' "$work/pytest.log" | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')"
tests_secs=$((SECONDS - start))

# 2. the kernel benchmark (its table, machine line first)
if ! "$python" benchmarks/kernels.py "${bench_args[@]}" >"$work/bench.log" 2>&1; then
    status=1
fi

# 3. the engine's KV pool on this device (issue 13 point 5): sized from device memory on an
#    accelerator (an explicit default on the CPU), as `energon info` reports it for the demo model
start=$SECONDS
pool="$("$python" -m energon_jax.cli info 2>"$work/info.log" | grep -m 1 '^KV pool' | sed 's/^KV pool *//; s/|/\//g' || true)"
info_secs=$((SECONDS - start))
if [[ $pool == *"sized from device memory"* ]]; then pool_ok=yes; else pool_ok=no; fi

# 4. one table
{
    echo "## device check: $(grep -m 1 '^# ' "$work/bench.log" | sed 's/^# //')"
    echo
    grep -m 1 '^| case ' "$work/bench.log"
    grep -m 1 '^|---' "$work/bench.log"
    echo "| kernel tests compiled for the device ($(basename "${pytest_args[0]}" .py)...) | pytest | $((tests_secs * 1000)) | | | | ${summary:-no summary} | all pass | ${tests_ok} |"
    grep '^| ' "$work/bench.log" | grep -v '^| case ' || true
    echo "| kv pool of the demo model (energon info) | engine | $((info_secs * 1000)) | | | | ${pool:-no KV pool line} | sized from device memory | ${pool_ok} |"
} >"$out"
cat "$out"
if [[ $tests_ok != yes ]]; then
    echo "--- failing tests (tail of the pytest log):" >&2
    tail -n 40 "$work/pytest.log" >&2
fi
if grep -q ' | error | ' "$work/bench.log" || ! grep -q '^| case ' "$work/bench.log"; then
    echo "--- benchmark errors (tail of its log):" >&2
    tail -n 20 "$work/bench.log" >&2
    status=1
fi
exit "$status"
