# Sourced by gpu_check.sh and mixer/bench/quality_gpu.sh: makes this checkout runnable with the image's
# python3 (CUDA torch, no network, mixer not installed). The checkout goes on PYTHONPATH (the `mixer
# serve` subprocess inherits it); whatever else is missing comes from the wheels that gpu_wheels.sh
# downloaded (.wheels/ in the repository root, or MIXER_WHEELS), installed offline into a temporary
# folder that goes on PYTHONPATH too. Returns 1, naming the module, when something is still missing.
# Also by hand, before `python3 -m pytest -m gpu`: . mixer/megatron/gpu_env.sh
mixer_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
mixer_wheels=${MIXER_WHEELS:-$mixer_repo/.wheels}
mixer_site=${TMPDIR:-/tmp}/mixer-gpu-site
command -v python3 >/dev/null || { echo "gpu_env: no python3 on PATH" >&2; return 1; }
export PYTHONPATH=$mixer_repo${PYTHONPATH:+:$PYTHONPATH}
echo "gpu_env: $(command -v python3) ($(python3 -V 2>&1)), PYTHONPATH=$PYTHONPATH"

mixer_missing() {  # prints one line per module that does not import; succeeds when none is missing
  python3 -W ignore - <<'EOF'
import importlib, sys
bad = []
for name in ("torch", "megatron.core", "sqlalchemy", "alembic", "grpc_health", "grpc_reflection",
             "mixer", "mixer.server.app", "mixer.megatron.pretrain", "mixer.bench.quality"):
    try:
        importlib.import_module(name)
    except Exception as e:
        bad.append(f"  {name}: {type(e).__name__}: {e}")
print("\n".join(bad))
sys.exit(1 if bad else 0)
EOF
}

if mixer_bad=$(mixer_missing); then
  echo "gpu_env: every module imports; nothing installed"
elif compgen -G "$mixer_wheels/*.whl" >/dev/null; then
  echo "gpu_env: missing:"; echo "$mixer_bad"
  mixer_whl=("$mixer_wheels"/*.whl)
  echo "gpu_env: installing the ${#mixer_whl[@]} wheels in $mixer_wheels into $mixer_site (offline)"
  rm -rf "$mixer_site"
  # --ignore-requires-python: see gpu_wheels.sh (megatron-core 0.19.2's cp311 wheel)
  python3 -m pip install --quiet --no-index --no-deps --ignore-requires-python \
    --target "$mixer_site" "${mixer_whl[@]}"
  export PYTHONPATH=$mixer_site:$PYTHONPATH
  if ! mixer_bad=$(mixer_missing); then
    echo "gpu_env: still missing after installing $mixer_wheels:" >&2; echo "$mixer_bad" >&2; return 1
  fi
  echo "gpu_env: every module imports; PYTHONPATH=$PYTHONPATH"
else
  echo "gpu_env: missing:" >&2; echo "$mixer_bad" >&2
  echo "gpu_env: no wheels in $mixer_wheels: run 'bash mixer/megatron/gpu_wheels.sh' on a machine" \
    "with network and bring .wheels/ with the checkout" >&2
  return 1
fi
