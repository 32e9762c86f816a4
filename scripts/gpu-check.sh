#!/usr/bin/env bash
# The one prepared GPU check (scripts/gpu_check.py): `bash scripts/gpu-check.sh [--smoke] [--out FILE]`.
# Uses $PYTHON if set, else the repository's .venv if there is one, else python3.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec "$python" "$root/scripts/gpu_check.py" "$@"
