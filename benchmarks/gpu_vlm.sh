#!/usr/bin/env bash
# The whole vision-language model's cost on one GPU: the default strategies (CLIP-only, DINOv2-only and
# the default fusion) with each 7B language model, bf16 and CUDA events (bench=gpu), one job per
# language model, then one aggregated report. LIMIT_S caps the sweep so that the whole script fits in
# 8 minutes of GPU time; a sweep cut there keeps its finished jobs. Not yet run on a GPU.
# Usage: benchmarks/gpu_vlm.sh OUT_DIR [more fusion-bench overrides]
#   LLMS     language-model presets, comma-separated (default qwen2_5_7b,vicuna_7b)
#   FUSIONS  fusion presets, comma-separated (default eagle)
#   LIMIT_S  time limit of the sweep in seconds (default 420)
# Writes OUT_DIR/env.txt (GPU, versions, the command), OUT_DIR/log.txt, the sweep's job folders under
# OUT_DIR/sweep and its aggregate OUT_DIR/sweep/report.{md,json} and pareto.png. A sweep cut short keeps
# its finished jobs, and the aggregate lists the ones that did not finish.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: benchmarks/gpu_vlm.sh OUT_DIR [overrides]}"
shift
mkdir -p "$out"
command=(python3 -m encoder_fusion.benchmarks.cli -m bench=gpu "llm=${LLMS:-qwen2_5_7b,vicuna_7b}" "fusion=${FUSIONS:-eagle}"
    "hydra.sweep.dir=$out/sweep" "$@")
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    date -u +%Y-%m-%dT%H:%M:%SZ
    echo "command: ${command[*]}"
} > "$out/env.txt"
timeout "${LIMIT_S:-420}" "${command[@]}" > "$out/log.txt" 2>&1
echo "sweep exit $?" >> "$out/env.txt"
python3 -c "import sys; from encoder_fusion.benchmarks.cli import report_main; sys.exit(report_main(sys.argv[1:]))" \
    "$out/sweep" >> "$out/log.txt" 2>&1
echo "report exit $?" >> "$out/env.txt"
cat "$out/env.txt"
