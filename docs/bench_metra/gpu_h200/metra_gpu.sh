#!/bin/bash
# Issue 3's pixel check on a lent GPU: METRA from 64x64 pixels on MuJoCo Warp (cuda), stopped by a time limit.
T0=$(date +%s); el() { echo "[metra_gpu] $(( $(date +%s) - T0 )) s: $*"; }
mkdir -p /tmp/site
if [ ! -f /tmp/site/warp/bin/warp.so ]; then
  cat /tmp/parts/warpso.part1 .whl/B/warpso.part2 | xz -d -T0 | tar -x -C /tmp/site || { el "warp.so unpack failed"; ls -la /tmp/parts; }
  xz -d -T0 < .whl/B/rest.tar.xz | tar -x -C /tmp/site
fi
xz -d -T0 < /tmp/parts/extra.tar.xz | tar -x -C /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site /tmp/parts/latentrl-*.whl 2>&1 | grep -v WARN
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
export PYTHONPATH=/tmp/site MUJOCO_GL=egl PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/gpu.txt; lscpu | grep "Model name" >> $OUT/gpu.txt; cat $OUT/gpu.txt
el unpacked
python3 -c "import latentrl.training.cli, latentrl.agents.metra, matplotlib.pyplot, tqdm, warp, mujoco_warp" || { el "imports failed"; exit 1; }
el imports
TRAIN_S=${TRAIN_S:-430}
timeout -s KILL $(( TRAIN_S + 100 )) timeout -s INT $TRAIN_S python3 scripts/bench_metra.py --part pixels \
  --steps 5000000 --eval-every ${EVAL_EVERY:-40000} --updates-per-step 0.125 --threads 8 --goals 24 --baseline-envs 512 \
  --out $OUT/out --run-root $OUT/runs --override device=cuda env.backend=mjwarp env.num_envs=64 eval.num_envs=48 \
  agent.eval_num_skills=48 agent.lr=3e-4 agent.batch_size=256 buffer_capacity=300000 learning_starts=10000 \
  checkpoint_every=100000000 log.every=5000 2>&1 | grep -v "settotalmass\|^Module \|LazyTensorStorage" | tee $OUT/train.log | tail -40
el done
rm -rf $OUT/runs/*/checkpoints; du -sh $OUT/* | head
