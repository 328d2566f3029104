#!/usr/bin/env bash
# Downloads the Python 3.12 x86-64 wheels the GPU machine lacks (scripts/device_bench.sh
# installs them there, offline) into .whl/ (git-ignored), without their dependencies: each one
# needed is named here. That machine has torch 2.11, jax 0.11.2 (+ the CUDA 13 plugin), flax,
# optax, orbax-checkpoint, transformers 5.17, peft, huggingface_hub 1.33, safetensors, absl-py,
# etils, protobuf, cloudpickle, psutil, regex, requests, filelock, pillow, numpy, tqdm.
#   diffusers        the PyTorch side (needs huggingface_hub>=1.32, regex, requests, filelock,
#                    safetensors>=0.8, Pillow: all there; importlib_metadata only below 3.8)
#   grain            persona_jax's data pipeline and checkpoints (+ array_record, portpicker)
#   ml_collections   persona_jax's train configs
#   flax, optax, orbax_checkpoint
#                    our minimum versions, installed there only where the machine's are older
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-python3}"
wheels=(diffusers==0.42.1 grain==0.2.18 array_record==0.8.6 portpicker==1.6.0
        ml_collections==1.1.0 flax==0.12.8 optax==0.2.8 orbax_checkpoint==0.12.8)
mkdir -p .whl
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${wheels[@]}"
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
ls -l .whl/*.whl
echo "device_wheels: $(ls .whl/*.whl | wc -l) wheels, $((total / 1024 / 1024)) MiB in .whl/"
if ((total > 50 * 1024 * 1024)); then
  echo "device_wheels: over 50 MiB (the device call carries 64 MiB at most)" >&2
  exit 1
fi
