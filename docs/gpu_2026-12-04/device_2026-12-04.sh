#!/bin/bash
# One lent-GPU call (2026-12-04): issue 14/16 GPU timings (scripts/gpu_checks.sh PARTS=open), then issue 14's
# point_mass world model trained on the GPU from the carried data, saved for the CPU checks. Results: one tarball.
set -u
T0=$(date +%s)
PY=${PY:-python3}
OUT=${OUT:-/tmp/device_out}
BUDGET=${BUDGET:-530}
mkdir -p "$OUT/run" /tmp/site /tmp/aidata
tar -C /tmp/site -xJf "${SITE_TAR:-.gpucarry/site.tar.xz}"
export PYTHONPATH=/tmp/site${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH} MUJOCO_GL=egl PYTHONUNBUFFERED=1
(tar -C /tmp/aidata -xJf .gpucarry/ai_pm_data.tar.xz && echo "[device] data unpacked at $(( $(date +%s) - T0 )) s") &
$PY -c "import torch, latentrl, torchrl, tensordict, mujoco, dm_control, hydra; print('[device] imports ok; torch', torch.__version__, latentrl.__file__)" 2>&1 | tail -3
echo "[device] $(( $(date +%s) - T0 )) s: gpu_checks"
# gpu_checks.sh calls `python`; the image may have only python3 (in a venv: a wrapper, not a link, keeps it)
mkdir -p /tmp/pybin; rm -f /tmp/pybin/python; printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v $PY)" > /tmp/pybin/python; chmod +x /tmp/pybin/python
export PATH=/tmp/pybin:$PATH
OUT="$OUT/run" timeout ${CHECKS_LIMIT:-300} bash scripts/gpu_checks.sh
wait
LEFT=$(( BUDGET - ($(date +%s) - T0) ))
echo "[device] $(( $(date +%s) - T0 )) s: point_mass world model on ${DEVICE:-cuda} for ${LEFT} s"
timeout $(( LEFT + 40 )) $PY scripts/bench_active_inference.py --task point_mass-easy_visible --episode-length 250 \
  --train-episodes 200 --heldout-episodes 10 --data /tmp/aidata --save-model "$OUT/run/ai_pm_gpu.pt" \
  --updates ${AI_UPDATES:-30000} --train-seconds "$LEFT" --checks latency --latency-presets "" --device "${DEVICE:-cuda}" \
  --threads "$(nproc)" --out "$OUT/run/ai_train.md" --fig-dir "$OUT/run/ai_train" > "$OUT/run/ai_train.log" 2>&1
echo "[device] ai_train exit $?"; tail -4 "$OUT/run/ai_train.log"
tar -C "$OUT" -czf /tmp/device_run.tgz run && rm -rf "$OUT/run" && mv /tmp/device_run.tgz "$OUT/"
echo "[device] done at $(( $(date +%s) - T0 )) s"; ls -la "$OUT"
