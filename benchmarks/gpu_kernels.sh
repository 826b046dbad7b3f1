#!/usr/bin/env bash
# The GPU checks of the Triton grid_fuse kernels, in priority order, each under its own time limit
# so that a short GPU session still gets the earlier steps:
#   1. the kernel tests compiled on the GPU (correctness first),
#   2. the tiling sweep (default tiling against its neighbours, ratios from one run),
#   3. the benchmark against eager PyTorch and torch.compile.
# Usage: benchmarks/gpu_kernels.sh OUT_DIR   (limits in seconds: TESTS_S, TILES_S, BENCH_S)
# Every step writes into OUT_DIR as it goes; a step cut short keeps what it finished.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: benchmarks/gpu_kernels.sh OUT_DIR}"
mkdir -p "$out"
export TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt" || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$out/gpu.txt"

timeout "${TESTS_S:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_grid_fuse_kernel.py \
    > "$out/tests.txt" 2>&1
echo "tests exit $?" >> "$out/gpu.txt"

timeout "${TILES_S:-150}" python3 -m benchmarks.kernel_tiles --batch 128 32 \
    --case clip-L14-336+dinov2-L14 clip-B16+dinov2-B14 --out "$out/tiles.json" > "$out/tiles.txt" 2>&1
echo "tiles exit $?" >> "$out/gpu.txt"

timeout "${BENCH_S:-180}" python3 -m benchmarks.kernels --batch 128 32 8 1 --out "$out/kernels.json" \
    > "$out/kernels.txt" 2>&1
echo "kernels exit $?" >> "$out/gpu.txt"
cat "$out/gpu.txt"
