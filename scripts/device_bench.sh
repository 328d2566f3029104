#!/usr/bin/env bash
# The prepared GPU benchmark: persona_jax against diffusers PyTorch on one GPU, in one command
# that installs nothing from the network (persona_jax/benchmark/device.py says what it measures).
#
#   scripts/device_bench.sh [--dry-run] [--out DIR] [--budget S] [--cases sample lora ...]
#
# Carried wheels (.whl/, from scripts/device_wheels.sh) are installed into /tmp/site, each only
# where the machine lacks the package or has an older version; persona_jax itself runs from
# this checkout (PYTHONPATH), without its dependencies. Results go to DIR (default $OUT, else
# out/device_bench): device_bench.jsonl (each record as measured) and device_bench.md.
# --dry-run: the same path on CPU with a tiny model, in seconds. PYTHON picks the interpreter
# (default python3).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python3}"

shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]})); then
  # The wheels this machine needs: the package missing, or installed at an older version.
  mapfile -t needed < <("$python" - "${wheels[@]}" <<'PY'
import importlib.metadata as md
import os
import sys

from packaging.version import Version
for wheel in sys.argv[1:]:
  name, version = os.path.basename(wheel).split("-")[:2]
  try:
    have = md.version(name)
  except md.PackageNotFoundError:
    have = None
  if have is None or Version(have) < Version(version):
    print(wheel)
PY
)
  if ((${#needed[@]})); then
    echo "device_bench: installing ${needed[*]} into /tmp/site" >&2
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "${needed[@]}"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m persona_jax.benchmark.device "$@"
