#!/bin/bash
# Pack what a lent GPU machine lacks into .gpucarry/site.tar.xz (about 17 MB), to travel with a device call.
#
# The lent H200's image has Python 3.12 and torch (2.11 when last seen) but no mujoco, dm_control, tensordict, torchrl,
# hydra or gymnasium, and it cannot download. This installs their Python 3.12 manylinux wheels (the versions this
# venv has) and latentrl itself (a wheel of the working tree) into one folder, prunes what our code never loads,
# and packs it. On the device, scripts/gpu_device.sh unpacks it and runs a command with it on PYTHONPATH:
#
#   bash scripts/gpu_pack.sh                                   # here, in the venv (about 1 minute)
#   run(command="bash scripts/gpu_device.sh bash scripts/gpu_checks.sh", carry=[".gpucarry"])   # the device tool
#
# Extra folders to carry (a dataset): tar -cJf .gpucarry/NAME.tar.xz -C DIR . (point_mass's 625 MB of frames
# packs into 10 MB); a device call carries at most 64 MiB with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.gpucarry/" .git/info/exclude 2>/dev/null || echo "/.gpucarry/" >> .git/info/exclude
mkdir -p .gpucarry
SITE=$(mktemp -d)
WHEEL=$(mktemp -d)
trap 'rm -rf "$SITE" "$WHEEL"' EXIT
version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
PACKAGES=()
for name in mujoco tensordict torchrl dm_control gymnasium hydra-core omegaconf dm-env Farama-Notifications PyOpenGL pyvers; do
  PACKAGES+=("$name==$(version "$name")")
done
python -m pip install -q --target "$SITE" --python-version 3.12 --implementation cp --only-binary=:all: --no-deps \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any "${PACKAGES[@]}"
# antlr4-python3-runtime (hydra's parser) is published as a source archive only: its pure-Python package is copied
cp -r "$(python -c 'import antlr4, os; print(os.path.dirname(antlr4.__file__))')" "$SITE/"
python -m pip wheel -q --no-deps --no-build-isolation -w "$WHEEL" .
python -m pip install -q --no-deps --target "$SITE" "$WHEEL"/latentrl-*.whl
rm -rf "$SITE"/{benchmarks,sota-check,sota-implementations,scripts,bin} "$SITE"/dm_control/{locomotion,manipulation} \
  "$SITE"/dm_control/suite/dog_assets "$SITE"/mujoco/experimental
find "$SITE" -name __pycache__ -prune -exec rm -rf {} +
tar -C "$SITE" -cf - . | xz -6 -T2 > .gpucarry/site.tar.xz
echo "packed: $(du -h .gpucarry/site.tar.xz | cut -f1) .gpucarry/site.tar.xz (${PACKAGES[*]}, latentrl)"
