#!/usr/bin/env bash
# Run on a machine WITH network: downloads the wheels that gpu_check.sh and quality_gpu.sh need and a
# CUDA torch image (Python 3.12, x86_64) lacks, so they run there with no network and no install.
# Usage: bash mixer/megatron/gpu_wheels.sh [DIR]      (DIR default: .wheels/ in the repository root;
#        the *.whl already in DIR are removed first, so it holds one version of each)
# Then carry DIR with the checkout; mixer/megatron/gpu_env.sh installs it into a temporary folder.
# PYVER=3.11 fetches the same versions for another Python (to try gpu_env.sh without a GPU).
# grpcio, protobuf, packaging and typing-extensions come along because the image's versions are unknown
# (mixer/v1 is generated for grpcio 1.76 and protobuf >= 6.31; megatron-core wants packaging >= 24.2,
# alembic typing-extensions >= 4.12). Not needed here: psycopg (SQLite only), ray (sweeps only),
# greenlet (SQLAlchemy 2.1 asks for it only for asyncio).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
dir=${1:-$repo/.wheels}
pyver=${PYVER:-3.12}
mkdir -p "$dir"
rm -f "$dir"/*.whl
# --ignore-requires-python: megatron-core 0.19.2 declares Python >= 3.12 but also ships cp311 wheels,
# which import on 3.11 (.ci/run tests them); it changes nothing for 3.12, where every pin fits.
python3 -m pip download --no-deps --only-binary=:all: --ignore-requires-python \
  --python-version "$pyver" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dir" \
  megatron-core==0.19.2 \
  grpcio==1.76.0 grpcio-health-checking==1.76.0 grpcio-reflection==1.76.0 protobuf==6.33.6 \
  sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3 \
  packaging==26.4 typing-extensions==4.16.0
ls -l "$dir"
du -sh "$dir"
