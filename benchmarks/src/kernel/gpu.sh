#!/usr/bin/env bash
# The GPU checks of the Triton grid_fuse kernels, in priority order, each under its own time limit
# so that a short GPU session still gets the earlier steps:
#   1. the kernel tests compiled on the GPU (correctness first),
#   2. the tiling sweep (default tiling against its neighbours, ratios from one run),
#   3. the benchmark against eager PyTorch and torch.compile.
# Usage: benchmarks/src/kernel/gpu.sh OUT_DIR   (limits in seconds: TESTS_S, TILES_S, BENCH_S)
# Every step writes into OUT_DIR as it goes (7 files: gpu.txt, tests.txt, log.txt, tiles.json/.md,
# kernels.json/.md); a step cut short keeps what it finished.
# Needs pytest, hypothesis, omegaconf and hydra-core importable by the GPU machine's python3; a
# machine without them takes them on PYTHONPATH, installed for that python's version (hypothesis
# ships a compiled part, so its wheel must match that version).
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${1:?usage: benchmarks/src/kernel/gpu.sh OUT_DIR}"
mkdir -p "$out"
export TRITON_INTERPRET="${TRITON_INTERPRET:-0}"  # 1 only to try the script on a CPU
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt" 2>/dev/null || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$out/gpu.txt"

# The tests compile a few hundred kernel variants; 8 pytest processes share the work (and the
# Triton cache), each on every 8th test.
ids="$out/test_ids.txt"
python3 -m pytest --collect-only -q -p no:cacheprovider tests/kernels/test_grid_fuse_kernel.py \
    tests/kernels/test_grid_fuse_validation.py | grep '::' > "$ids"
for shard in 0 1 2 3 4 5 6 7; do
    awk -v s="$shard" 'NR % 8 == s' "$ids" > "$out/tests_$shard.ids"
    timeout "${TESTS_S:-240}" xargs -d '\n' -a "$out/tests_$shard.ids" \
        python3 -m pytest -q -p no:cacheprovider > "$out/tests_$shard.log" 2>&1 &
done
wait
cat "$out"/tests_*.log > "$out/tests.txt"
rm -f "$out"/tests_*.log "$out"/tests_*.ids "$ids"
echo "tests: $(grep -hE '^[0-9]+ (passed|failed)|(passed|failed|error)' "$out/tests.txt" | tail -n 8 | tr '\n' ' ')" >> "$out/gpu.txt"

timeout "${TILES_S:-150}" python3 -m encoder_fusion.benchmarks.kernel.tiles --batch 128 32 \
    --case clip-L14-336+dinov2-L14 clip-B16+dinov2-B14 --out "$out/tiles.json" > /dev/null 2>> "$out/log.txt"
echo "tiles exit $?" >> "$out/gpu.txt"

timeout "${BENCH_S:-180}" python3 -m encoder_fusion.benchmarks.kernel.bench --batch 128 32 8 1 --out "$out/kernels.json" \
    > /dev/null 2>> "$out/log.txt"
echo "kernels exit $?" >> "$out/gpu.txt"
cat "$out/gpu.txt"
