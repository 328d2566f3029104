#!/usr/bin/env bash
# Prepares, here, the Python 3.12 x86-64 packages the GPU machine lacks, for
# scripts/device_bench.sh to install there offline: each wheel is downloaded (without its
# dependencies: each one needed is named below) and stored in .whl/ (git-ignored) as
# NAME-VERSION-TAGS.tar.xz, the wheel's contents recompressed. A device call carries 64 MiB in
# all, the tracked tree included (about 61 MiB in December 2026), and xz makes diffusers' 6.4 MB
# wheel 1.8 MB; every wheel here is pure Python (no .data folder), so unpacking one into a
# folder on PYTHONPATH is what `pip install --target` does.
#
# That machine has torch 2.11, jax 0.11.2 (+ the CUDA 13 plugin), flax, optax, orbax-checkpoint,
# transformers 5.17, peft, huggingface_hub 1.33, safetensors, absl-py, pyyaml, regex, requests,
# filelock, pillow, numpy, tqdm, packaging.
#   diffusers        the PyTorch side (needs huggingface_hub>=1.32, regex, requests, filelock,
#                    safetensors>=0.8, Pillow: all there; importlib_metadata only below 3.8)
#   ml_collections   persona_jax's train configs
#   flax, optax, orbax_checkpoint
#                    our minimum versions, unpacked there only where the machine's are older
# Not carried: grain (+ array_record, portpicker; 3.4 MB compressed): the benchmark never
# imports it (data pipelines and checkpoints only; checked with imports of it refused).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-python3}"
wheels=(diffusers==0.42.1 ml_collections==1.1.0 flax==0.12.8 optax==0.2.8 orbax_checkpoint==0.12.8)
limit=$((64 * 1024 * 1024))
download="$(mktemp -d)"
trap 'rm -rf "$download"' EXIT
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$download/wheels" "${wheels[@]}"
rm -rf .whl.tmp
mkdir .whl.tmp
for wheel in "$download"/wheels/*.whl; do
  name="$(basename "$wheel" .whl)"
  "$python" -m zipfile -e "$wheel" "$download/$name"
  if compgen -G "$download/$name/*.data" >/dev/null; then
    echo "device_wheels: $name has a .data folder (unpacking is not installing it)" >&2
    exit 1
  fi
  XZ_OPT=-9e tar -cJf ".whl.tmp/$name.tar.xz" -C "$download/$name" .
done
rm -rf .whl
mv .whl.tmp .whl
ls -l .whl
bundles=$(du -cb .whl/*.tar.xz | tail -1 | cut -f1)
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) \
        | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "device_wheels: $(ls .whl | wc -l) packages, $((bundles / 1024)) KiB; with the working tree" \
     "($((tree / 1024 / 1024)) MiB) $(((tree + bundles) / 1024 / 1024)) MiB of the 64 MiB a call carries"
if ((tree + bundles > limit)); then
  echo "device_wheels: over the 64 MiB a device call carries" >&2
  exit 1
fi
