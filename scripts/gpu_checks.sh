#!/bin/bash
# The GPU checks of the open issues, in one command for a lent GPU machine (see /work/.library/device or the
# README's benchmarks section); every result and each part's log land in $OUT (default ./gpu_out). The open issues'
# parts come first, so a short lease still gets them. Each set of parts stays under 9 minutes (its timeouts add up
# to 510 / 570 s), so one device call of at most 10 minutes runs one set:
#
#   PARTS=open bash scripts/gpu_checks.sh      # issues 14 and 16 (with latentrl installed: pip install -e ".[dev,gpu]")
#   PARTS=issue19 bash scripts/gpu_checks.sh   # the GPU tests and rows of issue 19 (closed; re-measured when time is left)
#   PARTS=train STAMO_DIR=... AI_DATA=... bash scripts/gpu_checks.sh   # training runs of issues 14 / 16 (see below)
#   PARTS=pm AI_PM_DATA=... bash scripts/gpu_checks.sh   # issue 14's point_mass model with the lr drop (see below)
#
# Where the machine's image lacks the packages and cannot download (the lent H200s so far), pack them here with
# scripts/gpu_pack.sh and run this script through scripts/gpu_device.sh (as on 2026-12-04:
# `bash scripts/gpu_device.sh bash scripts/gpu_checks.sh`, carry .gpucarry). Nothing here renders with dm_control
# (MUJOCO_GL=disable: its EGL import failed on those machines): the parts time untrained models on random frames.
#
# Environment: PARTS (default "open"; "open,issue19" runs both sets), DEVICE (default cuda; cpu with
# QUICK=1 is the dry run tests/test_bench_scripts.py makes, so a typo here never costs a lease), OUT.
set -u -o pipefail
OUT=${OUT:-gpu_out}
DEVICE=${DEVICE:-cuda}
PARTS=${PARTS:-open}
QUICK=${QUICK:-0}
mkdir -p "$OUT"
export MUJOCO_GL=${MUJOCO_GL:-disable} PYTHONUNBUFFERED=1  # nothing renders; EGL may be missing
T0=$(date +%s)
FAILED=0
step() { echo "[gpu_checks] $(( $(date +%s) - T0 )) s: $*"; }
# run NAME TIMEOUT_S LINES CMD...: the part's whole output goes to $OUT/NAME.log and its last LINES lines here; a part
# that fails or times out is reported and the next part still runs
run() {
  local name=$1 limit=$2 lines=$3; shift 3
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "$lines" "$OUT/$name.log"
  if [ "$rc" != 0 ]; then echo "[gpu_checks] FAILED (exit $rc, see $OUT/$name.log): $*"; FAILED=1; fi
}
THREADS=$(nproc)
if [ "$QUICK" = 1 ]; then  # the dry run: the same commands at the smallest sizes
  LAT_STEPS=3; LEARN=(--max-seconds 1 --min-blocks 1 --warmup 1 --timeout 120); PAPER=smoke; SMALL=smoke
else
  LAT_STEPS=200; LEARN=(--max-seconds 5 --timeout 90); PAPER=paper; SMALL=small
fi

if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
  python -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.cuda.get_device_name())" \
    | tee -a "$OUT/gpu.txt" || exit 1
fi

if [[ ",$PARTS," == *",open,"* ]]; then
  step "issue 14: active inference policy step latency at batch 1, planner presets paper / small / realtime"
  run ai_latency 150 6 python scripts/bench_active_inference.py --checks latency --device "$DEVICE" \
    --threads "$THREADS" --latency-presets paper,small,realtime --latency-steps "$LAT_STEPS" \
    --out "$OUT/bench_ai_latency.md" --fig-dir "$OUT/bench_ai_latency"

  step "issues 14 and 16: world-model updates (active inference, StaMo's flow decoder + encoder, PV-RNN), paper preset"
  run learner_open_paper 240 6 python scripts/bench_learner.py --device "$DEVICE" --threads "$THREADS" \
    --variants on --preset "$PAPER" --agents active_inference stamo pv_rnn "${LEARN[@]}" \
    --json "$OUT/bench_learner_open_paper.json" --out "$OUT/bench_learner_open_paper.md"

  step "issue 16: StaMo's update at the small preset (the one docs/bench_stamo.md times on the CPU)"
  run learner_stamo_small 120 4 python scripts/bench_learner.py --device "$DEVICE" --threads "$THREADS" \
    --variants on --preset "$SMALL" --agents stamo "${LEARN[@]}" \
    --json "$OUT/bench_learner_stamo_small.json" --out "$OUT/bench_learner_stamo_small.md"
fi

if [[ ",$PARTS," == *",issue19,"* ]]; then
  step "GPU tests (issue 19: the loop without host syncs, fused / compiled updates; MuJoCo Warp on CUDA)"
  run gpu_tests 240 30 python -m pytest -q -m gpu tests/test_online_loop.py tests/test_learner_speed.py \
    tests/test_mjwarp.py tests/test_replay.py

  step "online loop, METRA from pixels, 64 MuJoCo Warp envs (issue 19: bounded by the update?)"
  run online_loop 150 8 python scripts/bench_online_loop.py --device "$DEVICE" --num-envs 64 --steps 320 \
    --learning-starts 2048 --override agent.obs_type=pixels agent.batch_size=256 env.action_repeat=2 \
    env.floor=gradient --json "$OUT/bench_online_loop.json" --out "$OUT/bench_online_loop.md"

  step "every agent's update at its paper preset (issue 19: GPU rows of docs/bench_learner.md)"
  run learner_first_agents 180 20 python scripts/bench_learner.py --device "$DEVICE" --threads "$THREADS" \
    --variants on compile --preset "$PAPER" --agents metra:pixels metra:physics td_jepa:pixels td_jepa:state fb:pixels fb:state \
    "${LEARN[@]}" --json "$OUT/bench_learner_first_agents.json" --out "$OUT/bench_learner_first_agents.md"
fi
if [[ ",$PARTS," == *",train,"* ]]; then
  # Training that the open issues' unmet checks want and one CPU thread cannot give in a session. Nothing renders
  # on the lent machines, so the data is carried (pack a folder here with `tar -cJf .gpucarry/NAME.tar.xz -C DIR .`;
  # gpu_device.sh unpacks it to $CARRY/NAME) and evaluated here afterwards. A part whose variable is unset is skipped.
  #   STAMO_DIR  a `bench_stamo.py` --out-dir (episodes.pt; with stamo_wm.pt the run continues that checkpoint), e.g.
  #              the 250-episode reacher autoencoder of docs/bench_stamo.md; STAMO_SECONDS (default 180)
  #   AI_DATA    a `bench_active_inference.py` --data folder of reacher-easy (train/, heldout/: 100 + 10 uniform-random
  #              episodes x 250 steps); AI_MODEL (optional) a --save-model file to train on; AI_SECONDS (default 150)
  # With the defaults the two parts' timeouts add up to 480 s, so both fit one device call with the unpacking.
  # The results come back in $OUT: stamo_wm.pt + stamo_train_timing.json, ai_reacher_gpu.pt + ai_reacher_train/.
  STAMO_SECONDS=${STAMO_SECONDS:-180}; AI_SECONDS=${AI_SECONDS:-150}
  if [ "$QUICK" = 1 ]; then  # tiny data made here: random frames for StaMo, a --quick collection for the world model
    # --quick fixes the updates; the seconds are only a cap, wide enough for a loaded 2-core machine (with 30 s,
    # StaMo's 20 quick updates stopped at 7 beside another job and the dry-run test failed)
    STAMO_DIR=$OUT/quick_stamo; AI_DATA=$OUT/quick_ai_data; STAMO_SECONDS=120; AI_SECONDS=120
    mkdir -p "$STAMO_DIR"
    python -c "import sys, torch; torch.save({'pixels': torch.randint(0, 256, (5, 4, 3, 64, 64), dtype=torch.uint8)},
                                           sys.argv[1])" "$STAMO_DIR/episodes.pt"
    STAMO_SIZES=(--quick); AI_SIZES=(--quick)
  else
    STAMO_SIZES=(--updates 20000); AI_SIZES=(--episode-length 250 --train-episodes 100 --heldout-episodes 10 --updates 200000)
  fi
  if [ -n "${STAMO_DIR:-}" ]; then
    step "issue 16: StaMo's autoencoder on reacher trained on towards the spec's 20k updates ($STAMO_DIR)"
    run stamo_train $(( STAMO_SECONDS + 60 )) 4 python scripts/bench_stamo.py train --out-dir "$STAMO_DIR" \
      --device "$DEVICE" --threads "$THREADS" --train-seconds "$STAMO_SECONDS" "${STAMO_SIZES[@]}"
    cp "$STAMO_DIR/stamo_wm.pt" "$OUT/stamo_wm.pt" && cp "$STAMO_DIR/train_timing.json" "$OUT/stamo_train_timing.json"
  fi
  if [ -n "${AI_DATA:-}" ]; then
    step "issue 14: the reacher world model trained on the GPU ($AI_DATA${AI_MODEL:+, on from $AI_MODEL})"
    run ai_reacher_train $(( AI_SECONDS + 90 )) 4 python scripts/bench_active_inference.py --task reacher-easy \
      "${AI_SIZES[@]}" --data "$AI_DATA" ${AI_MODEL:+--load-model "$AI_MODEL" --resume} \
      --save-model "$OUT/ai_reacher_gpu.pt" --train-seconds "$AI_SECONDS" --checks latency --latency-presets "" \
      --device "$DEVICE" --threads "$THREADS" --out "$OUT/ai_reacher_train.md" --fig-dir "$OUT/ai_reacher_train"
  fi
fi

if [[ ",$PARTS," == *",pm,"* ]]; then
  # Issue 14's check 2 wants a point_mass world model trained far past what one CPU thread gives in a session (the
  # best one, 46k updates with the learning rate dropped 1e-3 -> 1e-4 -> 1e-5, took a GPU lease plus ~2 h here). This
  # trains one in a single device call, A at lr 1e-3 then B resumed at 1e-4; checks 1-3 run here on the CPU afterwards
  # (`bench_active_inference.py --load-model ai_pm_b.pt --checks 1,2`: check 2 ranks by the three risk forms).
  #   AI_PM_DATA  a `bench_active_inference.py` --data folder of point_mass-easy_visible (train/, heldout/: 200 + 10
  #               uniform-random episodes x 250 steps; collect here, then tar -cJf .gpucarry/ai_pm.tar.xz -C DIR .)
  #   AI_PM_MODEL (optional) a --save-model file to train on; AI_PM_SECONDS (default 60: ~4k updates on the H200,
  #   short of the run-away at lr 1e-3 that collapsed the CPU run at 6.8k updates and spiked the GPU one at 7.5k,
  #   docs/bench_active_inference.md), AI_PM_DROP_SECONDS (default 310: ~20k updates at lr 1e-4, which has not spiked
  #   in 20k updates on the CPU). Timeouts add up to 520 s. Results in $OUT: ai_pm_a.pt, ai_pm_b.pt, logs;
  #   a gradient burst is traced term by term in the log and its update written to $OUT/<leg>/burst.<update>.pt.
  AI_PM_SECONDS=${AI_PM_SECONDS:-60}; AI_PM_DROP_SECONDS=${AI_PM_DROP_SECONDS:-310}
  if [ "$QUICK" = 1 ]; then
    AI_PM_DATA=$OUT/quick_ai_pm_data; AI_PM_SECONDS=120; AI_PM_DROP_SECONDS=120; PM_SIZES=(--quick)
  else
    PM_SIZES=(--episode-length 250 --train-episodes 200 --heldout-episodes 10 --updates 200000)
  fi
  if [ -z "${AI_PM_DATA:-}" ]; then
    echo "[gpu_checks] FAILED: PARTS=pm needs AI_PM_DATA (a point_mass data folder)"; FAILED=1
  else
    pm() {  # pm NAME SECONDS ARGS...: one training leg of the point_mass model
      local name=$1 seconds=$2; shift 2
      run "$name" $(( seconds + 75 )) 4 python scripts/bench_active_inference.py --task point_mass-easy_visible \
        "${PM_SIZES[@]}" --data "$AI_PM_DATA" --train-seconds "$seconds" --checks latency --latency-presets "" \
        --device "$DEVICE" --threads "$THREADS" --out "$OUT/$name.md" --fig-dir "$OUT/$name" \
        --burst-dump "$OUT/$name/burst" "$@"
    }
    step "issue 14: point_mass world model, lr 1e-3 ($AI_PM_DATA${AI_PM_MODEL:+, on from $AI_PM_MODEL})"
    pm ai_pm_a "$AI_PM_SECONDS" ${AI_PM_MODEL:+--load-model "$AI_PM_MODEL" --resume} --save-model "$OUT/ai_pm_a.pt"
    step "issue 14: the same model trained on at lr 1e-4"
    pm ai_pm_b "$AI_PM_DROP_SECONDS" --load-model "$OUT/ai_pm_a.pt" --resume --save-model "$OUT/ai_pm_b.pt" \
      --set lr=0.0001
  fi
fi

step "done (a part failed: $FAILED)"
exit "$FAILED"
