#!/usr/bin/env bash
# `mixer bench quality` on one GPU (needs python3 with CUDA torch; mixer/megatron/gpu_env.sh supplies the
# rest offline, see mixer/megatron/README.md): a ~125M GPT (12 layers x 768,
# 12 heads, sequence 1024, batch 16, bf16 through Float16Module), 400 steps each for uniform, odm and
# doremi (reference = the uniform run), one seed, the mixer service on SQLite beside it.
# Budget (estimated, not yet measured: gpu_check.sh's ~0.1 s per 8k-token step on an H100 suggests
# ~0.2 s per 16k-token step here): data preparation ~20 s, 3 runs of ~80-110 s plus start-up and
# 10 balanced evaluations each: about 7 minutes; `timeout 570` keeps it inside 10.
#
# Usage: bash mixer/bench/quality_gpu.sh [CORPUS] [OUT] [more `mixer bench quality` options]
#   CORPUS  default mixer/bench/minipile (the corpus shipped in the repository)
#   OUT     default /tmp/mixer-bench-quality-gpu (checkpoints of the 125M model are large); result.json,
#           quality.png and table.md are copied to $OUT when that is set (the device machine's return folder)
#   more options, e.g. `--noise-domains 2 --strategies uniform,doremi,dga` (the CPU benchmark's setting
#           where mixing has something to fix). The files are rewritten after every run, so a run cut
#           off by the timeout still returns the runs it finished.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
. mixer/megatron/gpu_env.sh
corpus=${1:-mixer/bench/minipile}
out=${2:-/tmp/mixer-bench-quality-gpu}
shift $(( $# < 2 ? $# : 2 ))
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
status=0
timeout 570 python3 -m mixer.bench.quality --corpus "$corpus" --device cuda --size gpu \
  --strategies uniform,odm,doremi --steps 400 --seeds 1 --out "$out" --json "$@" || status=$?
if [ -n "${OUT:-}" ]; then
  for f in result.json quality.png table.md; do [ -f "$out/$f" ] && cp "$out/$f" "$OUT/"; done
fi
exit $status
