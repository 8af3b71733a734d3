#!/bin/bash
# The GPU checks of the open issues, in one command for a lent GPU machine (see /work/.library/device or the
# README's benchmarks section). At most about 14 minutes (each part has a timeout); every result lands in $OUT (default ./gpu_out).
#
#   bash scripts/gpu_checks.sh            # with latentrl installed: pip install -e ".[dev,gpu]"
#
# Where the machine's image lacks the packages and cannot download (the lent H200s so far), carry them as
# docs/bench_envs_mjwarp.md describes and put them on PYTHONPATH before calling this script.
set -u -o pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export MUJOCO_GL=${MUJOCO_GL:-egl} PYTHONUNBUFFERED=1
T0=$(date +%s)
step() { echo "[gpu_checks] $(( $(date +%s) - T0 )) s: $*"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.cuda.get_device_name())" \
  | tee -a "$OUT/gpu.txt" || exit 1

step "GPU tests (issue 19: the loop without host syncs, fused / compiled updates; MuJoCo Warp on CUDA)"
timeout 300 python -m pytest -q -m gpu tests/test_online_loop.py tests/test_learner_speed.py tests/test_mjwarp.py \
  tests/test_replay.py 2>&1 | tail -30 | tee "$OUT/gpu_tests.txt"

step "online loop, METRA from pixels, 64 MuJoCo Warp envs (issue 19: bounded by the update?)"
timeout 240 python scripts/bench_online_loop.py --device cuda --num-envs 64 --steps 320 --learning-starts 2048 \
  --override agent.obs_type=pixels agent.batch_size=256 env.action_repeat=2 env.floor=gradient \
  --json "$OUT/bench_online_loop_cuda.json" --out "$OUT/bench_online_loop_cuda.md" 2>&1 | tail -8

step "every agent's update at its paper preset (issue 19: GPU rows of docs/bench_learner.md)"
timeout 300 python scripts/bench_learner.py --device cuda --threads 16 --variants on compile \
  --agents metra:pixels metra:physics td_jepa:pixels td_jepa:state fb:pixels fb:state \
  --max-seconds 5 --timeout 90 --json "$OUT/bench_learner_cuda.json" --out "$OUT/bench_learner_cuda.md" 2>&1 | tail -20
step done
