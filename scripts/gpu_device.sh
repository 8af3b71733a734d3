#!/bin/bash
# Run a command on a lent GPU machine with what scripts/gpu_pack.sh packed, and bring its $OUT back as one file.
#
#   bash scripts/gpu_device.sh bash scripts/gpu_checks.sh                  # the open issues' GPU timings
#   bash scripts/gpu_device.sh python scripts/bench_active_inference.py ... --device cuda --save-model '$OUT/m.pt'
#
# Unpacks .gpucarry/site.tar.xz (and any other .gpucarry/NAME.tar.xz into $CARRY/NAME) and puts the site on
# PYTHONPATH; `python` runs the image's python3 (gpu_checks.sh and the benches call `python`); MUJOCO_GL=disable,
# since nothing here renders and dm_control's EGL import fails on an image without libEGL (seen 2026-12-04).
# The command writes under $OUT; the device tool returns at most 8 files, so everything under $OUT is packed
# into $OUT/device_out.tgz at the end (unpack it with tar -xzf).
set -u
OUT=${OUT:-/tmp/device_out}
WORK=$(mktemp -d)
SITE=$WORK/site CARRY=$WORK/carry PYBIN=$WORK/bin
mkdir -p "$OUT" "$SITE" "$CARRY" "$PYBIN"
T0=$(date +%s)
PACKED=${PACKED:-.gpucarry}  # another folder for a dry run here (tests/test_bench_scripts.py)
SITE_TAR=$PACKED/site.tar.xz
tar -C "$SITE" -xJf "$SITE_TAR" || exit 1
for f in "$PACKED"/*.tar.xz; do
  [ -e "$f" ] && ! [ "$f" -ef "$SITE_TAR" ] || continue
  name=$(basename "$f" .tar.xz)
  mkdir -p "$CARRY/$name" && tar -C "$CARRY/$name" -xJf "$f" || exit 1
done
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} MUJOCO_GL=${MUJOCO_GL:-disable} PYTHONUNBUFFERED=1
PY=$(command -v python3)
# a wrapper, not a link: python3 may live in a venv, which a link from elsewhere would leave
printf '#!/bin/sh\nexec %s "$@"\n' "$PY" > "$PYBIN/python" && chmod +x "$PYBIN/python"
export PATH=$PYBIN:$PATH OUT CARRY
python -c "import torch, latentrl; print('[gpu_device] torch', torch.__version__, 'cuda', torch.cuda.is_available())"
echo "[gpu_device] $(( $(date +%s) - T0 )) s: $*"
(eval "$@")  # a subshell: an `exit` in the command still leaves $OUT packed
rc=$?
echo "[gpu_device] $(( $(date +%s) - T0 )) s: exit $rc"
(cd "$OUT" && tar -czf "$WORK/device_out.tgz" --exclude=./device_out.tgz . && find . -mindepth 1 -delete \
  && mv "$WORK/device_out.tgz" .)
rm -rf "$WORK"
exit $rc
