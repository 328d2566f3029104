#!/usr/bin/env bash
# The prepared GPU benchmark: persona_jax against diffusers PyTorch on one GPU, in one command
# that installs nothing from the network (persona_jax/benchmark/device.py says what it measures).
#
#   scripts/device_bench.sh [--dry-run] [--out DIR] [--budget S] [--cases sample lora ...]
#
# Carried packages (.whl/NAME-VERSION-*.tar.xz: wheels' contents, from scripts/device_wheels.sh)
# are unpacked into /tmp/site, each only where the machine lacks the package or has an older
# version; persona_jax itself runs from this checkout (PYTHONPATH), without its dependencies.
# Results go to DIR (default $OUT, else out/device_bench): device_bench.jsonl (each record as
# measured) and device_bench.md.
# --dry-run: the same path on CPU with a tiny model. PYTHON picks the interpreter (default
# python3); DEVICE_BENCH_PACKAGES and DEVICE_BENCH_SITE the bundles' folder and where they go.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python3}"

shopt -s nullglob
packages="${DEVICE_BENCH_PACKAGES:-.whl}"
site="${DEVICE_BENCH_SITE:-/tmp/site}"
bundles=("$packages"/*.tar.xz)
if ((${#bundles[@]})); then
  # The packages this machine needs: missing, or installed at an older version.
  mapfile -t needed < <("$python" - "${bundles[@]}" <<'PY'
import importlib.metadata as md
import os
import sys

try:
  from packaging.version import Version
except ImportError:          # then only missing packages are unpacked
  Version = None
for bundle in sys.argv[1:]:
  name, version = os.path.basename(bundle).split("-")[:2]
  try:
    have = md.version(name)
  except md.PackageNotFoundError:
    have = None
  if have is None or (Version is not None and Version(have) < Version(version)):
    print(bundle)
PY
)
  if ((${#needed[@]})); then
    echo "device_bench: unpacking ${needed[*]} into $site" >&2
    # Python's tarfile, not tar: the machine may lack xz.
    "$python" -c 'import sys, tarfile
for bundle in sys.argv[2:]:
  with tarfile.open(bundle) as t:
    t.extractall(sys.argv[1], filter="data")' "$site" "${needed[@]}"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m persona_jax.benchmark.device "$@"
