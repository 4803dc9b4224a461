#!/usr/bin/env bash
# The GPU check on one GPU machine without network: two OPD rounds of a Qwen3-0.6B-shaped
# model, timed (scripts/gpu_check.py says what it runs and what it prints).
#
#   scripts/gpu_check.sh                 # the machine's python3 with CUDA PyTorch + transformers
#   scripts/gpu_check.sh --layers 8      # fewer layers, if building 28 takes too long
#   PYTHON=/opt/py312/bin/python3 scripts/gpu_check.sh
#
# What the machine lacks (megatron-core, pydantic, pyarrow, fastapi, uvicorn, httpx, ...) comes
# from .gpu-wheels/ (filled by `make gpu-wheels` where there is network; at most 64 MiB):
# installed offline with --no-deps into .gpu-venv/, a venv that sees the system's packages.
# Ray and Prefect are not installed there (Ray's wheel alone is larger than 64 MiB): the check
# runs the Megatron trainer in its own process and the engines through the launcher, the
# parts of a run that need a GPU. It stops with one line saying what is missing, and is
# killed if it runs longer than OPD_GPU_CHECK_LIMIT seconds (default 480: 8 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
WHEELS=${OPD_GPU_WHEELS:-.gpu-wheels}
VENV=${OPD_GPU_VENV:-.gpu-venv}
LIMIT=${OPD_GPU_CHECK_LIMIT:-480}

fail() {
  echo "gpu_check.sh: $*" >&2
  exit 2
}

command -v "$PYTHON" >/dev/null || fail "no $PYTHON (set PYTHON=/path/to/python3)"
case " $* " in
  *" --device cpu "*) ;;  # the CPU rehearsal needs no GPU
  *)
    "$PYTHON" - <<'EOF' || exit 2
import sys
try:
    import torch
except ImportError:
    sys.exit("gpu_check.sh: torch is not importable: the check uses this machine's CUDA PyTorch")
if not torch.cuda.is_available():
    sys.exit(f"gpu_check.sh: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
EOF
    ;;
esac
compgen -G "$WHEELS/*.whl" >/dev/null ||
  fail "no wheels in $WHEELS/: run \`make gpu-wheels\` where there is network, bring the folder"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv --system-site-packages "$VENV" || fail "cannot create the venv $VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
  --find-links "$WHEELS" "$WHEELS"/*.whl || fail "installing the wheels of $WHEELS/ failed"

status=0
timeout --kill-after=30 "$LIMIT" "$VENV/bin/python" scripts/gpu_check.py "$@" || status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
  echo "gpu_check.sh: the check did not finish within ${LIMIT}s and was stopped" >&2
fi
exit "$status"
