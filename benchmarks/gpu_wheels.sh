#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels that benchmarks/gpu_suite.py
# needs on a bare GPU machine that has torch, torchvision, timm, regex, tqdm,
# huggingface_hub, safetensors and pytest but no open_clip and no package registry
# (Python 3.12, x86-64; see benchmarks/README.md for the device command).
# open_clip_torch needs ftfy, which needs wcwidth; the versions are requirements/cpu-lock.txt's.
#
#   bash benchmarks/gpu_wheels.sh            # PYTHON=python3.11 bash ... to pick the pip
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4)

rm -rf .whl && mkdir -p .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  -d .whl "${WHEELS[@]}"
ls -l .whl
# Each wheel must install on any CPython 3.12 x86-64 Linux: pure Python (none-any) or the
# stable ABI for manylinux x86-64 (wcwidth 0.9 ships compiled abi3 wheels).
for wheel in .whl/*.whl; do
  case "$wheel" in
    *-none-any.whl | *-abi3-manylinux*_x86_64*.whl) ;;
    *) echo "ERROR: $wheel would not install on CPython 3.12 x86-64" >&2; exit 1 ;;
  esac
done
echo "wheels ready in .whl/ ($(du -sh .whl | cut -f1)); carry '.whl' in the device run"
