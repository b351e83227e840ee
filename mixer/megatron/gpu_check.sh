#!/usr/bin/env bash
# GPU check (needs one CUDA GPU, torch with CUDA and megatron-core installed): a ~125M GPT for a few
# hundred steps with the mixer attached and detached in the same run; prints the step-time ratio.
# Usage: bash mixer/megatron/gpu_check.sh [--steps 300] [--block 25]
# Then the CUDA tests: python -m pytest -m gpu tests/megatron -q
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
timeout 480 python -m mixer.megatron.gpu_check "$@"
