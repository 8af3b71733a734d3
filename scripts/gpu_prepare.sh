#!/bin/bash
# Build the whole carry of the next GPU lease in one command, from nothing: this machine starts bare in most sessions
# (/work and .gpucarry/ do not survive), and nothing renders on the lent machines, so the data is collected here.
#
#   bash scripts/gpu_prepare.sh            # in the venv, in the background at a session's start (~10 min, 2 cores)
#   WHAT="site pm" bash scripts/gpu_prepare.sh   # only some of it
#
# WHAT (default "site pm reacher stamo") picks what goes into CARRY_DIR (default .gpucarry/, git-ignored; the site
# always goes to .gpucarry/), one tarball each:
#   site     scripts/gpu_pack.sh: the packages the lent image lacks, and latentrl itself (~17 MB; repack after
#            changing code, the device imports latentrl from it)
#   pm       issue 14's point_mass data for PARTS=pm: 200 + 10 uniform-random episodes x 250 steps (~10 MB)
#   reacher  issue 14's reacher data for PARTS=train (AI_DATA): 100 + 10 episodes x 250 steps (~6 MB)
#   stamo    issue 16's reacher episodes for PARTS=train (STAMO_DIR): 250 episodes, no checkpoint (~20 MB)
# DATA (default /work/gpu_data) keeps the unpacked folders, which the evaluation here reads afterwards. A folder that
# already holds its data is packed again, not collected again. The device commands: DEVELOPERS.md, "The next lease's
# plan". EPISODES_SCALE (default 1) divides every episode count (the dry run in the tests uses a large one).
set -euo pipefail
cd "$(dirname "$0")/.."
WHAT=${WHAT:-site pm reacher stamo}
DATA=${DATA:-/work/gpu_data}
SCALE=${EPISODES_SCALE:-1}
export MUJOCO_GL=${MUJOCO_GL:-egl}
CARRY=${CARRY_DIR:-.gpucarry}
mkdir -p "$CARRY" "$DATA"
n() { echo $(( ($1 + SCALE - 1) / SCALE )); }  # an episode count divided by SCALE, at least 1
say() { echo "[gpu_prepare] $(date -u +%H:%M:%S): $*"; }
pack() {  # pack NAME DIR FILES...: .gpucarry/NAME.tar.xz of DIR's FILES (default: all of DIR)
  local name=$1 dir=$2; shift 2
  tar -C "$dir" -cf - "${@:-.}" | xz -6 -T2 > "$CARRY/$name.tar.xz.tmp"
  mv "$CARRY/$name.tar.xz.tmp" "$CARRY/$name.tar.xz"
  say "packed $CARRY/$name.tar.xz ($(du -h "$CARRY/$name.tar.xz" | cut -f1))"
}
ai_data() {  # ai_data TASK TRAIN_EPISODES DIR: collect a bench_active_inference --data folder (one update, no checks)
  if [ -d "$3/train" ] && [ -d "$3/heldout" ]; then say "$3 holds data already"; return; fi
  local tmp
  tmp=$(mktemp -d)
  python scripts/bench_active_inference.py --task "$1" --episode-length 250 --train-episodes "$(n "$2")" \
    --heldout-episodes "$(n 10)" --data "$3" --updates 1 --checks 1 --mse-cases 10 --out "$tmp/page.md" \
    --fig-dir "$tmp" > "$tmp/log" 2>&1 || { cat "$tmp/log"; exit 1; }
  rm -rf "$tmp"
}
for part in $WHAT; do
  case $part in
    site) say "packing the site"; bash scripts/gpu_pack.sh ;;
    pm) say "collecting point_mass data"; ai_data point_mass-easy_visible 200 "$DATA/ai_pm"; pack ai_pm "$DATA/ai_pm" ;;
    reacher) say "collecting reacher data"; ai_data reacher-easy 100 "$DATA/ai_reacher"; pack ai_reacher "$DATA/ai_reacher" ;;
    stamo)
      say "collecting StaMo's reacher episodes"
      if [ ! -f "$DATA/stamo_r250/episodes.pt" ]; then
        python scripts/bench_stamo.py data --task reacher-easy --episodes "$(n 250)" --out-dir "$DATA/stamo_r250"
      fi
      pack stamo_r250 "$DATA/stamo_r250" episodes.pt ;;
    *) echo "[gpu_prepare] unknown part '$part' (site, pm, reacher, stamo)"; exit 2 ;;
  esac
done
du -ch "$CARRY"/*.tar.xz | tail -1 | awk '{print "[gpu_prepare] the carry: " $1 " of the 64 MiB a device call takes"}'
