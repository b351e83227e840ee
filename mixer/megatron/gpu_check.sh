#!/usr/bin/env bash
# GPU check (needs one CUDA GPU and python3 with CUDA torch): a ~125M GPT for a few hundred steps with
# the mixer attached and detached in the same run; prints the step-time ratio. The checkout need not be
# installed: gpu_env.sh puts it on PYTHONPATH and, offline, adds the wheels gpu_wheels.sh fetched.
# Usage: bash mixer/megatron/gpu_check.sh [--steps 300] [--block 25]
# Then the CUDA tests: . mixer/megatron/gpu_env.sh && python3 -m pytest -m gpu tests/megatron -q
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
. mixer/megatron/gpu_env.sh
timeout 480 python3 -m mixer.bench.gpu_check "$@"
